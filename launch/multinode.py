"""One machine's share of a multi-node training run (the code: fsl_dist/cli/multinode.py,
`fsl-multinode`); launch/slurm/multinode.sbatch starts one per node through srun:

    srun python launch/multinode.py --config configs/resnet_boil.yaml --run-dir runs/big
"""

import sys

from fsl_dist.cli.multinode import main

if __name__ == "__main__":
    sys.exit(main())
