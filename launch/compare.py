"""Compare runs: tables over runs and seeds, and learning curves (the code:
fsl_dist/cli/compare.py, `fsl-compare`).

    python launch/compare.py runs/four_systems/*
    python launch/compare.py --sweep configs/sweeps/four_systems.yaml
    python launch/compare.py --wandb my-team/fsl_dist --group four_systems
"""

import sys

from fsl_dist.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
