"""Packaging hook; everything else is declared in setup.cfg.

The wheel carries the repo's configs/ tree (sweeps/ included) as fsl_dist/configs/ (found by
fsl_dist.config.shipped_configs), so an installed `fsl-train --config cnn_maml` works from any
folder while the repo keeps one copy of each config. `inherit:` paths are relative to the file,
so the tree keeps its folders.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithConfigs(build_py):
    """build_py, plus configs/**.yaml copied to fsl_dist/configs/ in the build folder."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's configs/ in place
            return
        for source in sorted(CONFIGS.rglob("*.yaml")):
            relative = source.relative_to(CONFIGS)
            target = Path(self.build_lib, "fsl_dist", "configs", relative)
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildPyWithConfigs})
