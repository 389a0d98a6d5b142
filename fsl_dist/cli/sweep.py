"""Run a sweep (configs x seeds x overrides) as a SLURM array job, one run per array task.

    python launch/sweep.py list   configs/sweeps/cnn_shots.yaml              # index -> config, seed, overrides
    python launch/sweep.py submit configs/sweeps/cnn_shots.yaml --time=2:00:00 --gpus-per-node=1
    sbatch --array=0-7 launch/slurm/array.sbatch configs/sweeps/cnn_shots.yaml   # the same, by hand
    python launch/sweep.py run    configs/sweeps/cnn_shots.yaml --index 3    # what array task 3 runs
    fsl-sweep list cnn_shots                                  # installed: a shipped sweep by its name

The shipped sweeps (cnn_shots, four_systems) are found by name from any folder; a sweep file of
your own is given by its path. `submit` needs a checkout of the project (its
launch/slurm/array.sbatch); `list` and `run` work from an installed wheel too.
`submit` checks every run's config, then calls sbatch with the array size; whatever follows the
sweep file is passed to sbatch. `run` (what each array task calls) trains one run through
`accelerate launch`, one process per GPU of the allocation or `cpu_processes` on CPU, and turns
SIGUSR1/SIGTERM into a checkpoint and exit status 75 (resumable; the batch script requeues).
"""  # noqa: E501 (the --help text)

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from fsl_dist.cli import CHECKOUT, train_script
from fsl_dist.exits import exit_code
from fsl_dist.io import WriteFailure, make_folder
from fsl_dist.slurm import accelerate_command, processes_per_machine, supervise
from fsl_dist.sweep import SweepError, describe, load_sweep

# The batch script is the checkout's: the job calls back into it (launch/sweep.py) through FSL_ROOT.
ARRAY_SCRIPT = CHECKOUT / "launch" / "slurm" / "array.sbatch"
TRAIN_SCRIPT = train_script()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    listing = sub.add_parser("list", help="print the index -> config, seed, overrides table")
    listing.add_argument("sweep")
    listing.add_argument("--runs-dir", type=Path, help="instead of the sweep file's runs_dir")

    submit = sub.add_parser("submit", help="check every run, then sbatch the array job")
    submit.add_argument("--runs-dir", type=Path, help="instead of the sweep file's runs_dir")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch command only")
    submit.add_argument("sweep")
    submit.add_argument("sbatch_args", nargs=argparse.REMAINDER, metavar="sbatch options",
                        help="passed to sbatch after fsl_dist's own (so they win), "
                             "e.g. --time=4:00:00")

    run = sub.add_parser("run", help="train one run of the sweep (what each array task calls)")
    run.add_argument("sweep")
    run.add_argument("--index", type=int, help="run index (default: $SLURM_ARRAY_TASK_ID)")
    run.add_argument("--runs-dir", type=Path, help="instead of the sweep file's runs_dir")
    run.add_argument("--processes", type=int, help="processes for this run (default: one per GPU "
                     "of the allocation, or the sweep's cpu_processes without GPUs)")
    run.add_argument("--script", type=Path, default=TRAIN_SCRIPT,
                     help="training script (default launch/train.py)")
    run.add_argument("--dry-run", action="store_true", help="print the launch command only")
    return parser.parse_args(argv)


def cmd_list(args) -> int:
    sweep = load_sweep(args.sweep)
    sweep.check()
    print(describe(sweep, args.runs_dir))
    return 0


def cmd_submit(args) -> int:
    if not ARRAY_SCRIPT.is_file():
        raise SweepError(f"submit needs the project checkout's launch/slurm/array.sbatch (not at "
                         f"{ARRAY_SCRIPT}): run `python launch/sweep.py submit` from a clone")
    sweep = load_sweep(args.sweep)
    sweep.check()
    runs_dir = (args.runs_dir or sweep.runs_dir).resolve()
    logs = sweep.group_dir(runs_dir)
    argv = ["sbatch", f"--array={sweep.array_spec()}", f"--job-name=fsl-{sweep.name}",
            f"--output={logs}/slurm-%A_%a.out", *args.sbatch_args,
            str(ARRAY_SCRIPT), str(Path(args.sweep).resolve()), "--runs-dir", str(runs_dir)]
    print(shlex.join(argv))
    if args.dry_run:
        return 0
    make_folder(logs)  # sbatch does not create the folder of --output
    # The job finds this checkout and this interpreter (a venv) through these two variables.
    env = dict(os.environ, FSL_ROOT=str(CHECKOUT), FSL_PYTHON=sys.executable)
    return subprocess.run(argv, env=env).returncode


def cmd_run(args) -> int:
    sweep = load_sweep(args.sweep)
    index = args.index
    if index is None:
        if "SLURM_ARRAY_TASK_ID" not in os.environ:
            print("error: give --index, or run inside a SLURM array task", file=sys.stderr)
            return 2
        index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    run = sweep.run(index)
    run_dir = sweep.run_dir(run, args.runs_dir)
    if args.processes:
        processes, on_gpu = args.processes, (processes_per_machine(os.environ)[1])
    else:
        processes, on_gpu = processes_per_machine(os.environ, sweep.cpu_processes)
    argv, env = accelerate_command(args.script, sweep.train_args(run, args.runs_dir),
                                   processes=processes, on_gpu=on_gpu)
    print(f"sweep {sweep.name} run {index}/{len(sweep)}: {run.config_name} seed {run.seed} "
          f"{' '.join(run.overrides)} -> {run_dir} ({processes} {'GPU' if on_gpu else 'CPU'} "
          f"process{'es' if processes > 1 else ''})", flush=True)
    print(shlex.join(argv), flush=True)
    if args.dry_run:
        return 0
    return supervise(argv, env, script=args.script, run_dir=run_dir)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return {"list": cmd_list, "submit": cmd_submit, "run": cmd_run}[args.command](args)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WriteFailure as err:  # the log folder of `submit`
        print(f"error: {err}", file=sys.stderr)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
