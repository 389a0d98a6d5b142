"""Benchmark prediction: adaptation time and query images per second after adaptation.

    python launch/bench_predict.py
    python launch/bench_predict.py --json docs/benchmarks/predict.json --seconds 10

The code and what each column means: fsl_dist/bench/predict.py.
"""

from fsl_dist.bench.predict import main

if __name__ == "__main__":
    main()
