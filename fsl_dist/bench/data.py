"""Benchmark task sampling: tasks per second on one CPU thread, in memory or stream mode.

    python launch/bench_data.py --shards shards/omniglot-vinyals
    python launch/bench_data.py --shards shards/rgb84 --mode stream --tasks 5w1s15q 5w5s15q
    python launch/bench_data.py --shards shards/rgb84 --no-rotate --tasks 5w5s15q \
        --augment none lee2019 resized_crop

Stream mode reads the shards through ``make_tasks(..., mode="stream")``, the sampler training
uses, iterated in this process (a DataLoader with no workers).

Packs nothing: point --shards at a packed set (see launch/pack.py). Prints the machine, then a
Markdown table (one row per task shape and augmentation, meta-train part, class rotation on
as in training; ``--augment`` with the data.augment defaults, lee2019's).
"""

import argparse
import os
import platform
import time

import torch

from fsl_dist.bench.machine import cpu_model, read_cpuinfo
from fsl_dist.data import augment, episodes, shards

from .cases import parse_task

SHAPES = ((5, 1, 15), (20, 1, 5))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="shards/omniglot-vinyals", help="packed shard set")
    parser.add_argument("--part", default="train")
    parser.add_argument("--tasks-per-batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="time per configuration")
    parser.add_argument("--no-rotate", action="store_true")
    parser.add_argument("--mode", default="memory", choices=episodes.MODES)
    parser.add_argument("--augment", nargs="*", default=["none"], choices=augment.KINDS,
                        help="augmentations to time, one row each (default none)")
    parser.add_argument("--tasks", nargs="*", type=parse_task, default=list(SHAPES),
                        help="task shapes, e.g. 5w1s15q 5w5s15q (default 5w1s15q 20w1s5q)")
    return parser.parse_args(argv)


def tasks_per_second(tasks: episodes.MemoryTasks, per_batch: int,
                     seconds: float) -> tuple[float, int]:
    tasks.batch(0, range(per_batch))  # warm-up: builds the flat (rotated) pool once
    step, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step += 1
        tasks.batch(step, range(per_batch))
    return step * per_batch / (time.perf_counter() - start), step


def stream_tasks_per_second(args, spec: episodes.TaskSpec) -> tuple[float, int]:
    # far more batches than the time allows: the clock, not the epoch, ends the run
    stream = episodes.make_tasks(args.shards, args.part, spec, seed=0, mode="stream",
                                 tasks_per_batch=args.tasks_per_batch, batches=10**9,
                                 rank=0, world=1)
    batches = iter(stream)
    next(batches)  # warm-up: opens the first shards and fills the shuffle buffer
    step, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        next(batches)
        step += 1
    return step * args.tasks_per_batch / (time.perf_counter() - start), step


def rate_of(args, pool, spec: episodes.TaskSpec) -> tuple[float, int]:
    if args.mode == "stream":
        return stream_tasks_per_second(args, spec)
    return tasks_per_second(episodes.MemoryTasks(pool, spec, seed=0), args.tasks_per_batch,
                            args.seconds)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    pool = shards.load_class_pool(args.shards, args.part)
    cpu = cpu_model(read_cpuinfo()) or platform.processor() or "unknown"
    print(f"machine: {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, python {platform.python_version()}, "
          f"load average at start {os.getloadavg()[0]:.2f} (other jobs share this machine)")
    print(f"pool: {args.shards} part {args.part!r}, {pool.num_classes} classes, "
          f"images {tuple(pool.images.shape[-3:])}; {args.tasks_per_batch} tasks per batch, "
          f"{args.mode} mode\n")
    print("| task | rotate | augment | tasks/s | ms per task | batches timed |")
    print("|---|---|---|---|---|---|")
    for (n, k, q), kind in ((shape, kind) for shape in args.tasks for kind in args.augment):
        spec = episodes.TaskSpec(n, k, q, rotate=not args.no_rotate,
                                 augment=None if kind == "none" else augment.Augment(kind))
        rate, batches = rate_of(args, pool, spec)
        print(f"| {n}-way {k}-shot {q}-query | {spec.rotate} | {kind} | {rate:.0f} | "
              f"{1000 / rate:.2f} | {batches} |")
