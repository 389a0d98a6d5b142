"""Compare runs: a table of runs, the mean ± std over seeds per config, and a PNG of the
learning curves per config.

    python launch/compare.py runs/four_systems/*                        # run folders (offline)
    fsl-compare runs/four_systems/*                                     # installed
    python launch/compare.py --sweep configs/sweeps/four_systems.yaml   # the run folders of a sweep
    python launch/compare.py --wandb my-team/fsl_dist --group four_systems   # W&B API (online)

Run folders need no network: config.yaml, metrics.jsonl, eval.json and the offline W&B files
(for wall time) hold everything. The PNG goes to --plot (default: the sweep's folder, else
./compare.png); --csv writes one row per run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fsl_dist.compare import (
    aggregate,
    format_changes,
    format_groups,
    format_runs,
    from_run_dir,
    from_wandb,
    plot_curves,
    write_csv,
)
from fsl_dist.exits import exit_code
from fsl_dist.io import WriteFailure, check_writable
from fsl_dist.sweep import SweepError, load_sweep


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", type=Path, help="run folders")
    parser.add_argument("--sweep", help="compare the run folders of this sweep file")
    parser.add_argument("--runs-dir", type=Path,
                        help="with --sweep: instead of the sweep file's runs_dir")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from the W&B API")
    parser.add_argument("--group", help="with --wandb: the W&B group (a sweep's name)")
    parser.add_argument("--plot", type=Path, help="PNG of the learning curves")
    parser.add_argument("--csv", type=Path, help="also write one row per run here")
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.run_dirs, args.sweep, args.wandb)) != 1:
        parser.error("give run folders, or --sweep SWEEP, or --wandb ENTITY/PROJECT --group G")
    if args.wandb and not args.group:
        parser.error("--wandb needs --group (a sweep's name, or a config's name)")
    return args


def collect(args) -> tuple[list, Path, str]:
    """(runs, default plot path, title)."""
    if args.wandb:
        return (from_wandb(args.wandb, args.group), Path(f"compare-{args.group}.png"),
                f"{args.wandb} group {args.group}")
    if args.sweep:
        sweep = load_sweep(args.sweep)
        dirs = [sweep.run_dir(run, args.runs_dir) for run in sweep.runs()]
        missing = [d for d in dirs if not (d / "config.yaml").is_file()]
        if missing:
            print(f"{len(missing)} of {len(dirs)} runs have not started: "
                  + ", ".join(d.name for d in missing), file=sys.stderr)
        runs = [from_run_dir(d) for d in dirs if d not in missing]
        return runs, sweep.group_dir(args.runs_dir) / "compare.png", f"sweep {sweep.name}"
    return [from_run_dir(d) for d in args.run_dirs], Path("compare.png"), ""


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs, default_plot, title = collect(args)
        plot = args.plot or default_plot
        for path in (plot, args.csv):  # before the tables, not after them
            if path is not None:
                check_writable(path)
    except (SweepError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WriteFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_code(err)
    if not runs:
        print("error: no runs to compare", file=sys.stderr)
        return 1
    groups = aggregate(runs)
    print(format_runs(runs))
    if format_changes(runs):
        print(format_changes(runs))
    print()
    print(format_groups(groups))
    try:
        plot_curves(groups, plot, title=title)
        print(f"\nlearning curves -> {plot}")
        if args.csv:
            write_csv(runs, args.csv)
            print(f"runs -> {args.csv}")
    except WriteFailure as err:  # checked above, but the disk may fill meanwhile
        print(f"error: {err}", file=sys.stderr)
        return exit_code(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
