"""What a training command (fsl-train, fsl-pretrain) does before it imports torch: read its
arguments, and on CPU start again under glibc's start-up tunables (or tcmalloc:
``train.cpu_allocator``).

glibc reads its tunables only when a program starts (fsl_dist/cpu_malloc.py, START_TUNABLES says
why they help), and a launcher such as accelerate's starts the training processes with the
environment it was given. So a training process that will run on CPU with
``train.tune_cpu_malloc`` (the default) runs itself again at once, with the same PID, arguments
and descriptors, before the seconds of importing torch.
"""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from fsl_dist.config import load_config
from fsl_dist.cpu_malloc import chosen_allocator, restart_under_start_tunables

# Device nodes of the GPU drivers torch can use (NVIDIA's CUDA, AMD's ROCm).
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")


def train_parser(description: str, parser_class=argparse.ArgumentParser, add_help: bool = True):
    parser = parser_class(description=description, add_help=add_help,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="YAML config file, or a shipped config's name (e.g. "
                        "configs/resnet_boil.yaml or resnet_boil)")
    parser.add_argument("--run-dir", help="run folder (default runs/<config name>-<seed>)")
    parser.add_argument("--resume", help="'auto' (newest checkpoint in the run folder that loads, "
                        "if any) or a checkpoint path")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: continue although the config changes what is "
                        "trained (algorithm, task, model, data, seed, optimiser); run.json "
                        "records each change and the step it took effect")
    parser.add_argument("--overwrite", action="store_true",
                        help="the run folder holds an old run: move it aside (to "
                        "<run-dir>.old-<time>) and start afresh")
    parser.add_argument("--traceback", action="store_true",
                        help="show the traceback of expected failures too (bad input, full disk)")
    parser.add_argument("--debug", action="store_true",
                        help="few steps, anomaly detection, deterministic, W&B off")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress (a bar on a terminal, also through accelerate "
                        "launch; plain lines every 30 s in a log)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    # overrides may come before or after options
    return train_parser(description).parse_intermixed_args(argv)


class _Silent(argparse.ArgumentParser):
    """A parser that raises instead of printing: the command itself reports bad arguments (and
    gives its --help, which this parser, made without one, takes for a bad argument)."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def on_cpu(env=None) -> bool:
    """Whether this process will train on CPU, judged without importing torch: accelerate's
    ``--cpu``, no visible CUDA device, or no GPU driver's device node at all."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    if env.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    return not any(os.path.exists(node) for node in GPU_DEVICE_NODES)


def restart_for_cpu_training(argv=None) -> None:
    """Run this process again under ``cpu_malloc.start_environment()`` (with
    ``train.cpu_allocator``) when it trains on CPU with ``train.tune_cpu_malloc``; returns
    where it does not (a GPU, the setting off, the user's own allocator settings, already
    restarted, tcmalloc asked for and not found) and where the arguments or the config are
    wrong, which the command then reports as it always does."""
    if not on_cpu():
        return
    try:
        args = train_parser("", _Silent, add_help=False).parse_intermixed_args(argv)
        train = load_config(args.config, args.overrides).train
    except Exception:  # noqa: BLE001 (any failure here is the command's to report)
        return
    if train.tune_cpu_malloc:
        budgeted = train.memory_budget_gb is not None
        restart_under_start_tunables(chosen_allocator(train.cpu_allocator, budgeted))


def train_command() -> NoReturn:
    """``fsl-train``."""
    restart_for_cpu_training()
    from fsl_dist.cli.train import command
    command()


def pretrain_command() -> NoReturn:
    """``fsl-pretrain``."""
    restart_for_cpu_training()
    from fsl_dist.cli.pretrain import command
    command()
