"""The command lines behind the console commands (fsl-train, fsl-predict, ...)."""
