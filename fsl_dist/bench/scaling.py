"""Throughput of launch/train.py by process layout, and the share of step time in the all-reduce.

Runs the same short training once per layout (processes x CPU threads per process) through
``accelerate launch``, reads each run's metrics.jsonl and prints one markdown table: tasks/s
(median over the logged steps after the warm-up), step time, all-reduce time (which includes
waiting for the slowest process) and its share of the step, and the all-reduced buffer size.
On this machine's 2 cores the question is 1 process x 2 threads against 2 processes x 1 thread:

    python launch/bench_scaling.py --config configs/cnn_maml.yaml --steps 30 \\
        task.k_shot=1 task.q_query=15 train.meta_batch_size=16

Layouts default to "1x2 2x1"; on a GPU node name process counts only (``--layouts 1 2 4 8``),
threads per process are then left to the trainer.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fsl_dist.slurm import free_port


def parse_layout(text: str) -> tuple:
    processes, _, threads = text.partition("x")
    try:
        return int(processes), int(threads) if threads else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"layout {text!r}: expected PROCESSESxTHREADS, e.g. 2x1")


def launch(train_script: Path, processes: int, threads, config: str, steps: int, run_dir: Path,
           overrides) -> None:
    """One short training run of ``train_script`` (launch/train.py) through accelerate launch,
    from the checkout that holds it (so that config paths are read relative to it)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "--num_processes", str(processes)]
    if processes > 1:
        command.insert(3, "--multi_gpu")
    command += [str(train_script), "--config", config, "--run-dir", str(run_dir),
                f"train.steps={steps}", "train.log_every=1", f"train.eval_every={10 * steps}",
                f"train.checkpoint_every={10 * steps}", "eval.episodes=25", "logging.wandb=false",
                *overrides]
    if threads:
        command.append(f"train.cpu_threads={threads}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(command, cwd=Path(train_script).resolve().parents[1], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-4000:]}")


def summarise(run_dir: Path, warmup: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_time" in r and r["step"] > warmup]
    run = json.loads((run_dir / "run.json").read_text())
    step = statistics.median(r["perf/step_time"] for r in rows)
    reduce = statistics.median(r["perf/allreduce_time"] for r in rows)
    return {"world_size": run.get("world_size"), "steps_timed": len(rows),
            "tasks_per_s": statistics.median(r["perf/tasks_per_s"] for r in rows),
            "step_s": step, "allreduce_s": reduce, "allreduce_share": reduce / step}


def main(argv=None, *, train_script: Path):
    """launch/bench_scaling.py's command line; ``train_script`` is launch/train.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cnn_maml.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--layouts", nargs="*", type=parse_layout, default=[(1, 2), (2, 1)],
                        metavar="PxT", help="processes x threads per process (default 1x2 2x1)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as for train.py")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes, threads in args.layouts:
            run_dir = Path(tmp) / f"{processes}x{threads or 'auto'}"
            launch(train_script, processes, threads, args.config, args.steps, run_dir,
                   args.overrides)
            row = {"processes": processes, "threads": threads, **summarise(run_dir, args.warmup)}
            if row["world_size"] != processes:
                sys.exit(f"asked for {processes} processes, the run had {row['world_size']}")
            rows.append(row)
    print(f"config {args.config} {' '.join(args.overrides)}; {args.steps} steps, medians of "
          f"steps {args.warmup + 1}-{args.steps}\n")
    print("| processes x threads | tasks/s | s/step | all-reduce s/step | all-reduce share |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['processes']} x {r['threads'] or 'auto'} | {r['tasks_per_s']:.2f} "
              f"| {r['step_s']:.3f} | {r['allreduce_s']:.4f} | {100 * r['allreduce_share']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
