"""Is bf16 (or float32) close enough for this run's meta-gradient? Measure it before switching.

    python launch/precision_check.py --config configs/cnn_maml.yaml --inner-steps 1,5
    python launch/precision_check.py --run-dir runs/cnn_maml-0 --checkpoint latest

(the first at a config's initial weights, the second at a run's trained weights)

What the columns mean: --help, or fsl_dist/bench/precision_check.py (the code).
"""

import sys

from fsl_dist.bench.precision_check import main

if __name__ == "__main__":
    sys.exit(main())
