"""Benchmark the speed cost of each MAML++ option: milliseconds per meta-gradient step.

    python launch/bench_mamlpp.py                       # Conv-4, 5-way 1-shot 15-query, 5 steps
    python launch/bench_mamlpp.py --rounds 3 --json runs/bench_mamlpp.json

Each row is ``meta_backward`` (what the trainer's step computes, without the all-reduce and Adam)
on one meta-batch of random Omniglot-sized tasks, with the inner loop of ``InnerLoopSpec`` plus
one option: MSL (uniform step weights: every step's query loss enters the objective), DA's
first-order phase, LSLR (learned per-step step sizes), BNWB (per-step batch-norm weights), BNRS
(with BNWB, collecting the batch statistics for the per-step running statistics, as the
trainer's step does), and MSL, LSLR, BNWB and BNRS together. Options are timed in
interleaved rounds so that drift of the machine hits them alike; a cell is the median over
rounds of the mean over the timed steps. Prints the machine line, then a Markdown table with each
option's time relative to the plain second-order step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fsl_dist.bench.machine import cpu_description
from fsl_dist.meta import InnerLoopSpec, LearnedInnerLR, meta_backward
from fsl_dist.models import build_model, collect_batch_stats, running_stats_norms

OPTIONS = ("second order", "MSL", "DA first-order phase", "LSLR", "BNWB", "BNWB + BNRS",
           "MSL + LSLR + BNWB + BNRS")
PER_STEP_BN = ("BNWB", "BNWB + BNRS", "MSL + LSLR + BNWB + BNRS")
COLLECTS = ("BNWB + BNRS", "MSL + LSLR + BNWB + BNRS")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="*", default=["maml", "boil", "anil"])
    parser.add_argument("--model", default="cnn", choices=("cnn", "resnet"))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--task", default="5,1,15", help="N-way,K-shot,Q-query")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def spec_for(option: str, model, algorithm: str, steps: int) -> InnerLoopSpec:
    uniform = tuple([1.0 / steps] * steps)
    lslr = LearnedInnerLR(model, algorithm, 0.4, steps=steps)
    base = InnerLoopSpec(algorithm, inner_steps=steps, inner_lr=0.4)
    return {"second order": base,
            "MSL": base.replace(step_weights=uniform),
            "DA first-order phase": base.replace(first_order=True),
            "LSLR": base.replace(inner_lr=lslr),
            "BNWB": base, "BNWB + BNRS": base,
            "MSL + LSLR + BNWB + BNRS": base.replace(step_weights=uniform, inner_lr=lslr)
            }[option]


def model_for(option: str, args, n_way: int):
    torch.manual_seed(0)
    steps = args.inner_steps if option in PER_STEP_BN else 0
    return build_model(args.model, n_way, width=args.width, bn_steps=steps,
                       bn_stats=option in COLLECTS)


def random_tasks(n: int, k: int, q: int, tasks: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n)
    return {"support_x": torch.rand(tasks, n * k, 1, 28, 28, generator=generator),
            "support_y": labels.repeat_interleave(k).expand(tasks, -1).clone(),
            "query_x": torch.rand(tasks, n * q, 1, 28, 28, generator=generator),
            "query_y": labels.repeat_interleave(q).expand(tasks, -1).clone()}


def seconds_per_step(model, tasks: dict, spec: InnerLoopSpec, steps: int,
                     collect: bool) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        with collect_batch_stats() if collect else contextlib.nullcontext() as collector:
            meta_backward(model, tasks, spec, acc_before=False)
        if collect:
            collector.means(running_stats_norms(model))

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(args) -> list[dict]:
    n, k, q = (int(v) for v in args.task.split(","))
    tasks = random_tasks(n, k, q, args.meta_batch)
    times = {}
    for _ in range(args.rounds):
        for algorithm in args.algorithms:
            for option in OPTIONS:
                model = model_for(option, args, n)
                spec = spec_for(option, model, algorithm, args.inner_steps)
                times.setdefault((algorithm, option), []).append(
                    seconds_per_step(model, tasks, spec, args.steps, option in COLLECTS))
    rows = []
    for (algorithm, option), seconds in times.items():
        median = statistics.median(seconds)
        base = statistics.median(times[(algorithm, "second order")])
        rows.append({"algorithm": algorithm, "option": option, "ms_per_step": 1000 * median,
                     "x_second_order": median / base, "rounds_ms": [1000 * s for s in seconds]})
    return rows


def machine() -> str:
    return (f"{cpu_description()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python "
            f"{platform.python_version()}, {torch.get_num_threads()} threads")


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"machine: {machine()}")
    print(f"{args.model}-{args.width}, task {args.task} (N,K,Q), {args.inner_steps} inner "
          f"steps, meta-batch {args.meta_batch}, float32, CPU default path; {args.rounds} "
          f"rounds of {args.steps} timed steps after one warm-up\n")
    rows = measure(args)
    print("| algorithm | option | ms per step | x second order | rounds (ms) |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['option']} | {r['ms_per_step']:.0f} | "
              f"{r['x_second_order']:.2f} | {', '.join(f'{t:.0f}' for t in r['rounds_ms'])} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": vars(args) | {
            "json": str(args.json)}, "rows": rows}, indent=1))
