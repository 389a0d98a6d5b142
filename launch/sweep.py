"""Run a sweep (configs x seeds x overrides) as a SLURM array job, one run per array task (the
code: fsl_dist/cli/sweep.py, `fsl-sweep`).

    python launch/sweep.py list   configs/sweeps/cnn_compare.yaml
    python launch/sweep.py submit configs/sweeps/cnn_compare.yaml --time=2:00:00 --gpus-per-node=1
    python launch/sweep.py run    configs/sweeps/cnn_compare.yaml --index 3

launch/slurm/array.sbatch calls `launch/sweep.py run` for each array task.
"""

import sys

from fsl_dist.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
