"""Throughput of launch/train.py by process layout, and the share of step time in the all-reduce.

    python launch/bench_scaling.py --config configs/cnn_maml.yaml --steps 30 \\
        task.k_shot=1 task.q_query=15 train.meta_batch_size=16
    python launch/bench_scaling.py --layouts 1 2 4 8     # a GPU node: process counts only

Layouts default to "1x2 2x1" (processes x CPU threads per process). What it measures:
fsl_dist/bench/scaling.py (the code).
"""

from pathlib import Path

from fsl_dist.bench.scaling import main

if __name__ == "__main__":
    main(train_script=Path(__file__).resolve().with_name("train.py"))
