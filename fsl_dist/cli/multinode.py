"""One machine's share of a multi-node training run; launch/slurm/multinode.sbatch starts one per
node through srun:

    srun python launch/multinode.py --config configs/resnet_boil.yaml --run-dir runs/big [key=value ...]
    srun fsl-multinode --config resnet_boil --run-dir runs/big           # installed from a wheel

Machine rank and count come from the srun task (SLURM_PROCID, SLURM_NTASKS), the main process
address and port from FSL_MAIN_ADDR / FSL_MAIN_PORT (the batch script sets them from
`scontrol show hostnames`). Each machine runs `accelerate launch` with one process per GPU it
was given, or --cpu-processes on CPU, and always --resume auto, so a requeued job continues.
gloo talks over the interface that leads to the main address (GLOO_SOCKET_IFNAME, unless set).
"""  # noqa: E501 (the --help text)

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from fsl_dist.cli import train_script
from fsl_dist.config import ConfigError, default_run_dir, load_config
from fsl_dist.slurm import (
    accelerate_command,
    gloo_interface,
    job_port,
    machine_of,
    processes_per_machine,
    supervise,
)

TRAIN_SCRIPT = train_script()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", help="run folder on a shared filesystem "
                        "(default runs/<config name>-<seed>)")
    parser.add_argument("--resume", default="auto", help="passed to train.py (default auto)")
    parser.add_argument("--cpu-processes", type=int, default=1,
                        help="processes per machine without GPUs")
    parser.add_argument("--dry-run", action="store_true",
                        help="print this machine's launch command only")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Every machine must name the same folder: settle the default here (as fsl_dist.cli.train's).
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    machine_rank, machines = machine_of(os.environ)
    processes, on_gpu = processes_per_machine(os.environ, args.cpu_processes)
    address = os.environ.get("FSL_MAIN_ADDR")
    if machines > 1 and not address:
        print("error: FSL_MAIN_ADDR is not set (launch/slurm/multinode.sbatch sets it)",
              file=sys.stderr)
        return 2
    train_args = ["--config", args.config, "--run-dir", str(run_dir), "--resume", args.resume,
                  *args.overrides]
    argv, env = accelerate_command(TRAIN_SCRIPT, train_args, processes=processes, on_gpu=on_gpu,
                                   num_machines=machines, machine_rank=machine_rank,
                                   main_address=address, main_port=job_port(os.environ))
    gloo = gloo_interface(env, address) if machines > 1 else None
    if gloo:  # the interface the other machines reach this one through (see interface_towards)
        env["GLOO_SOCKET_IFNAME"] = gloo
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    over = f", gloo over {gloo}" if gloo else ""
    print(f"machine {machine_rank}/{machines} on {node}: {processes} "
          f"{'GPU' if on_gpu else 'CPU'} process{'es' if processes > 1 else ''}, main "
          f"{address}:{job_port(os.environ)}{over} -> {run_dir}", flush=True)
    print(shlex.join(argv), flush=True)
    if args.dry_run:
        return 0
    return supervise(argv, env, script=TRAIN_SCRIPT, run_dir=run_dir)


if __name__ == "__main__":
    sys.exit(main())
