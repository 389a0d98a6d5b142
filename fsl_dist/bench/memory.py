"""Memory per task: peak RSS and time of one second-order meta-gradient per checkpoint level
(and of the implicit meta-gradient, level ``implicit``).

    python launch/bench_memory.py --steps 1 5 --levels none steps blocks

Each row runs in a fresh process (``python -m fsl_dist.bench.memory --row ...``): the
benchmark's ResNet-12 (64-160-320-640) at 84x84 RGB, one synthetic 5-way task (the shot and
query given), second order, MAML, float32, ``meta_backward`` as the trainer calls it, with the
trainer's allocator settings, started as a CPU training process is. Peak: the process's RSS
high-water mark (VmHWM), in absolute terms and above the RSS just before the task. Time: the one
task (no warm-up, so it includes first-call costs, alike for every level), wall and CPU (the
process's user + system time: with one intra-op thread, the figure that shared load disturbs
least). Each row saves its meta-gradient; the table gives its relative difference (norm of the
difference over the norm) from the ``none`` row of the same steps. Levels ``learn2learn``,
``higher`` and ``torchopt`` are the peers' second-order MAML on the same model and task, with
glibc's allocator as their users have it (launch/install_bench_peers.sh installs them).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from fsl_dist.cpu_malloc import start_environment, tune_cpu_malloc
from fsl_dist.meta import InnerLoopSpec, meta_backward
from fsl_dist.models import build_model

from .cases import synthetic_tasks
from .measure import peak_rss, reset_peak_rss

LEVELS = ("none", "steps", "blocks", "implicit")
# The peers' own second-order MAML on the same model and task (fsl_dist/bench/peers.py), with
# glibc's allocator as a user of theirs has it.
PEERS = ("learn2learn", "higher", "torchopt")


def spec_of(level: str, steps: int) -> InnerLoopSpec:
    """The row's inner loop: a checkpoint level, or ``implicit`` (iMAML with
    configs/imaml/cnn_5w1s.yaml's lambda, CG steps and damping; another meta-gradient, so its
    difference from ``none`` is not reported)."""
    if level == "implicit":
        return InnerLoopSpec("maml", steps, 0.4, vectorize=False, meta_gradient="implicit",
                             proximal_lambda=2.0, cg_steps=5, cg_damping=1.0)
    return InnerLoopSpec("maml", steps, 0.4, vectorize=False, checkpoint=level)


def case(k_shot: int, n_query: int) -> dict:
    return {"model": "resnet12", "algorithm": "maml", "n_way": 5, "k_shot": k_shot,
            "n_query": n_query, "meta_batch": 1, "image_size": 84, "channels": 3}


def run_row(level: str, steps: int, k_shot: int, n_query: int, grad_out: str,
            tune_malloc: bool = True) -> dict:
    """One task's meta-gradient in this process: peak RSS (MiB) and seconds."""
    if tune_malloc:
        tune_cpu_malloc()
    torch.manual_seed(0)
    spec_case = case(k_shot, n_query)
    model = build_model("resnet12", 5, width=64, in_channels=3, image_size=84)
    tasks = synthetic_tasks(spec_case, torch.device("cpu"))
    meta_gradient = row_method(level, steps, model, tasks, spec_case)
    base = reset_peak_rss()
    started, cpu_started = time.perf_counter(), time.process_time()
    meta_gradient()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    peak = peak_rss()
    torch.save(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), grad_out)
    return {"level": level, "steps": steps, "tuned_malloc": tune_malloc, "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "peak_mib": peak / 2**20,
            "above_start_mib": (peak - base) / 2**20}


def row_method(level: str, steps: int, model, tasks: dict, spec_case: dict):
    """The row's meta-gradient as a call: ``meta_backward`` at a level, or a peer's."""
    if level in PEERS:
        from .peers import METHODS
        return METHODS[level][1](model, tasks, {**spec_case, "inner_steps": steps})
    spec = spec_of(level, steps)
    return lambda: meta_backward(model, tasks, spec, acc_before=False, workers=1)


def _child(level, steps, k_shot, n_query, grad_out, tune_malloc) -> dict:
    command = [sys.executable, "-m", "fsl_dist.bench.memory", "--row", level, str(steps),
               "--shot", str(k_shot), "--query", str(n_query), "--grad-out", grad_out]
    command += [] if tune_malloc else ["--glibc-malloc-defaults"]
    # started as a CPU training process is (cli/starting.py), unless the row is glibc's defaults
    env = start_environment() if tune_malloc else None
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        return {"level": level, "steps": steps, "failed": done.stderr.strip()[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rel_diff(grad: str, reference: str) -> float:
    a, b = torch.load(grad), torch.load(reference)
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--levels", nargs="+", choices=LEVELS + PEERS, default=list(LEVELS),
                        help="checkpoint levels, implicit, and peers (run with glibc's "
                             "allocator as it is)")
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--glibc-malloc-defaults", action="store_true",
                        help="leave glibc's allocator as it is (the trainer tunes it on CPU)")
    parser.add_argument("--row", nargs=2, metavar=("LEVEL", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--grad-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(args.row[0], int(args.row[1]), args.shot, args.query,
                                 args.grad_out, not args.glibc_malloc_defaults)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        def grad_file(level, steps):
            return os.path.join(scratch, f"{level}-{steps}.pt")
        for steps in args.steps:
            for level in args.levels:
                tune = not args.glibc_malloc_defaults and level not in PEERS
                rows.append(_child(level, steps, args.shot, args.query, grad_file(level, steps),
                                   tune))
                print(_line(rows[-1]), flush=True)
        # After all rows, so that the heaviest (none) may run last.
        for row in rows:
            reference = grad_file("none", row["steps"])
            if "failed" not in row and row["level"] not in ("none", "implicit") \
                    and os.path.exists(reference):
                row["rel_diff_vs_none"] = _rel_diff(grad_file(row["level"], row["steps"]),
                                                    reference)
    print("| level | inner steps | peak RSS MiB | above start MiB | s per task | "
          "CPU s per task | rel. diff vs none |\n|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(_line(row))
    for line in growth_lines(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"case": case(args.shot, args.query), "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=1)


def growth_lines(rows: list[dict]) -> list[str]:
    """Per level measured at 1 step and more: what each further inner step adds to the peak
    above start, on average from 1 step to each larger count, as a share of the 1-step peak
    (the issue's "each further inner step adds at most 5% of the 1-step peak")."""
    lines = []
    for level in dict.fromkeys(row["level"] for row in rows):
        done = {r["steps"]: r["above_start_mib"] for r in rows
                if r["level"] == level and "failed" not in r}
        if 1 not in done:
            continue
        for steps in sorted(s for s in done if s > 1):
            per_step = (done[steps] - done[1]) / (steps - 1)
            lines.append(f"{level}: 1 to {steps} steps, {per_step:+.0f} MiB per further step, "
                         f"{100 * per_step / done[1]:.1f}% of the 1-step peak")
    return lines


def _line(row: dict) -> str:
    if "failed" in row:
        return f"| {row['level']} | {row['steps']} | failed: {row['failed']} |"
    diff = row.get("rel_diff_vs_none")
    shown = "" if diff is None else f"{diff:.1e}"
    return (f"| {row['level']} | {row['steps']} | {row['peak_mib']:.0f} | "
            f"{row['above_start_mib']:.0f} | {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | "
            f"{shown} |")


if __name__ == "__main__":
    main()
