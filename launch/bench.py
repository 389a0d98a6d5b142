"""Meta-training step throughput and peak memory: cases x methods -> rows -> markdown table.

A case is (model, algorithm, inner steps) at 5-way 1-shot 15-query with a meta-batch of 8
tasks; a method is a way to compute the meta-gradient (today fsl_dist's loop and vmap paths,
and the ANIL path without feature reuse; later other libraries). A step is meta_loss +
backward + Adam step on synthetic binary 28x28 images. Each row runs in its own process so
that its peak memory (CPU: max RSS above the RSS before the first step; GPU:
torch.cuda.max_memory_allocated) is its own.

    python launch/bench.py                    # full table, about 15 min on 2 CPU cores
    python launch/bench.py --quick            # smoke run, a few minutes
    python launch/bench.py --device cuda --json runs/bench.json
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fsl_dist.meta import meta_loss  # noqa: E402
from fsl_dist.models import build_model  # noqa: E402

N_WAY, K_SHOT, N_QUERY, META_BATCH, INNER_LR = 5, 1, 15, 8, 0.4


def fsl_dist_method(**options):
    """A method that steps with fsl_dist.meta.meta_loss under ``options``."""
    def step_fn(model, tasks, case):
        def step(optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = meta_loss(model, tasks, algorithm=case["algorithm"],
                                inner_steps=case["inner_steps"], inner_lr=INNER_LR, **options)
            loss.backward()
            optimizer.step()
        return step
    return step_fn


# name -> (applies to case?, step-function factory)
METHODS = {
    "loop": (lambda case: True, fsl_dist_method(vectorize=False)),
    "vmap": (lambda case: True, fsl_dist_method(vectorize=True)),
    "loop, no feature reuse": (lambda case: case["algorithm"] == "anil",
                               fsl_dist_method(vectorize=False, reuse_features=False)),
}


def cases(quick: bool, models=("cnn", "resnet"), algorithms=("maml", "boil", "anil")):
    steps = (1,) if quick else (1, 5)
    return [{"model": m, "algorithm": a, "inner_steps": s}
            for m in models for a in algorithms for s in steps]


def synthetic_tasks(device):
    g = torch.Generator().manual_seed(0)
    def images(n):
        return (torch.rand(META_BATCH, n, 1, 28, 28, generator=g) < 0.2).float().to(device)
    def labels(per_class):
        return torch.arange(N_WAY).repeat(per_class).expand(META_BATCH, -1).contiguous().to(device)
    return {"support_x": images(N_WAY * K_SHOT), "support_y": labels(K_SHOT),
            "query_x": images(N_WAY * N_QUERY), "query_y": labels(N_QUERY)}


def run_row(spec: dict) -> dict:
    """Measure one (case, method) in this process."""
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    case = spec["case"]
    model = build_model(case["model"], N_WAY).to(device)
    tasks = synthetic_tasks(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    step = METHODS[spec["method"]][1](model, tasks, case)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(spec["warmup"]):
        step(optimizer)
    times = []
    for _ in range(spec["steps"]):
        sync()
        start = time.perf_counter()
        step(optimizer)
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    median = statistics.median(times)
    return {**case, "method": spec["method"], "s_per_step": median,
            "tasks_per_s": META_BATCH / median, "peak_mem_mib": peak / 2**20,
            "steps": spec["steps"]}


def run_in_subprocess(spec: dict, timeout: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)],
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"row {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows) -> str:
    lines = ["| model | algorithm | inner steps | method | tasks/s | s/step | peak mem (MiB) |",
             "|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['algorithm']} | {r['inner_steps']} | {r['method']} "
                     f"| {r['tasks_per_s']:.2f} | {r['s_per_step']:.3f} "
                     f"| {r['peak_mem_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="1 inner step, 3 timed steps")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--models", nargs="*", default=["cnn", "resnet"], help="a subset of the rows")
    parser.add_argument("--algorithms", nargs="*", default=["maml", "boil", "anil"], help="a subset of the rows")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    rows = []
    for case in cases(args.quick, args.models, args.algorithms):
        for method in args.methods:
            if not METHODS[method][0](case):
                continue
            spec = {"case": case, "method": method, "device": args.device,
                    "threads": args.threads, "steps": steps, "warmup": warmup}
            rows.append(run_in_subprocess(spec, timeout=600))
            print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    machine = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
               f"device {args.device}, {args.threads} threads")
    print(f"{machine}\n\n{markdown(rows)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
