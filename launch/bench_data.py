"""Benchmark memory-mode task sampling: tasks per second on one CPU thread.

    python launch/bench_data.py --shards shards/omniglot-vinyals

Packs nothing: point --shards at a packed set (see launch/pack.py). The code:
fsl_dist/bench/data.py.
"""

from fsl_dist.bench.data import main

if __name__ == "__main__":
    main()
