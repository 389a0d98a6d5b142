"""Benchmark the speed cost of each MAML++ option (ms per meta-gradient step).

    python launch/bench_mamlpp.py --rounds 3 --json docs/benchmarks/mamlpp_xeon.json

The code and what each column means: fsl_dist/bench/mamlpp.py.
"""

from fsl_dist.bench.mamlpp import main

if __name__ == "__main__":
    main()
