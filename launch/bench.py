"""Meta-step speed, memory, FLOP rate and meta-gradient agreement: fsl_dist vs its peers.

    python launch/bench.py                    # full grid (48 cases): hours on 2 CPU cores
    python launch/bench.py --quick            # smoke run: 5-way 1-shot, 1 step, meta-batch 8
    python launch/bench.py --device cuda --json runs/bench.json
    python launch/bench.py --report --json docs/benchmarks/bench_maml.json   # a saved run's tables

What the methods are, how the peers run and what each column means: the docstring of
fsl_dist/bench/__init__.py (the code is in fsl_dist/bench/). Peers: launch/install_bench_peers.sh.
"""

import sys
from pathlib import Path

# This checkout's fsl_dist, also where another one is installed: the rows measure this code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsl_dist.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
