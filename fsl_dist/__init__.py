"""fsl_dist: distributed second-order meta-learning (MAML, BOIL, ANIL) for few-shot
classification."""

__version__ = "0.1.0"
