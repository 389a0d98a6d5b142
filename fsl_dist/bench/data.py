"""Benchmark memory-mode task sampling: tasks per second on one CPU thread.

    python launch/bench_data.py --shards shards/omniglot-vinyals

Packs nothing: point --shards at a packed set (see launch/pack.py). Prints the machine, then a
Markdown table (one row per task shape, meta-train part, class rotation on as in training).
"""

import argparse
import os
import platform
import time

import torch

from fsl_dist.bench.machine import cpu_model, read_cpuinfo
from fsl_dist.data import episodes, shards

SHAPES = ((5, 1, 15), (20, 1, 5))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="shards/omniglot-vinyals", help="packed shard set")
    parser.add_argument("--part", default="train")
    parser.add_argument("--tasks-per-batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="time per configuration")
    parser.add_argument("--no-rotate", action="store_true")
    return parser.parse_args(argv)


def tasks_per_second(tasks: episodes.MemoryTasks, per_batch: int,
                     seconds: float) -> tuple[float, int]:
    tasks.batch(0, range(per_batch))  # warm-up: builds the flat (rotated) pool once
    step, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step += 1
        tasks.batch(step, range(per_batch))
    return step * per_batch / (time.perf_counter() - start), step


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    pool = shards.load_class_pool(args.shards, args.part)
    cpu = cpu_model(read_cpuinfo()) or platform.processor() or "unknown"
    print(f"machine: {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, python {platform.python_version()}, "
          f"load average at start {os.getloadavg()[0]:.2f} (other jobs share this machine)")
    print(f"pool: {args.shards} part {args.part!r}, {pool.num_classes} classes, "
          f"images {tuple(pool.images.shape[-2:])}; {args.tasks_per_batch} tasks per batch\n")
    print("| task | rotate | tasks/s | batches timed |")
    print("|---|---|---|---|")
    for n, k, q in SHAPES:
        spec = episodes.TaskSpec(n, k, q, rotate=not args.no_rotate)
        rate, batches = tasks_per_second(episodes.MemoryTasks(pool, spec, seed=0),
                                         args.tasks_per_batch, args.seconds)
        print(f"| {n}-way {k}-shot {q}-query | {spec.rotate} | {rate:.0f} | {batches} |")
