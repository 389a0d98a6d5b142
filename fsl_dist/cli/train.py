"""Meta-train a config, on one process or many.

    accelerate launch launch/train.py --config configs/resnet_boil.yaml
    fsl-train --config cnn_maml train.steps=500                 # installed: a config by its name
    accelerate launch -m fsl_dist.cli.train --config resnet_boil
    accelerate launch --multi_gpu --num_processes 8 launch/train.py --config configs/cnn_maml.yaml train.seed=3
    python launch/train.py --config configs/cnn_maml.yaml --debug          # one process, a few steps
    accelerate launch launch/train.py --config configs/cnn_maml.yaml --resume auto

Overrides are dotted `section.key=value` pairs (YAML values): `train.steps=5000 precision=bf16`.
--config takes a file, or the name of a config shipped with fsl_dist (cnn_maml, cnn_boil,
resnet_maml, resnet_boil, miniimagenet/cnn_boil_5w1s, ...): a file that exists wins.
"""  # noqa: E501 (the --help text)

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from fsl_dist.cli.starting import parse_args, restart_for_cpu_training
from fsl_dist.signals import catch_ctrl_c_while_starting, leave, quit_now, stop_line

if __name__ == "__main__":  # python -m (fsl-train and launch/train.py do it first)
    restart_for_cpu_training()

# Before the slow imports (torch, accelerate: seconds): a Ctrl-C while the run starts prints one
# line instead of a KeyboardInterrupt traceback. Trainer.stop_on_signals takes over for training.
catch_ctrl_c_while_starting()

import torch  # noqa: E402

from fsl_dist.checkpoint import latest_checkpoint  # noqa: E402
from fsl_dist.config import default_run_dir, load_config  # noqa: E402
from fsl_dist.distributed import Distributed  # noqa: E402
from fsl_dist.exits import EXIT_DIVERGED, EXIT_STOPPED, exit_code, report  # noqa: E402
from fsl_dist.io import WriteFailure  # noqa: E402
from fsl_dist.trainer import Trainer  # noqa: E402


def debug_overrides() -> list[str]:
    """Debug mode: a few steps on a small meta-batch, W&B off, every step printed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return ["train.steps=6", f"train.meta_batch_size={2 * world}", "train.log_every=1",
            "train.eval_every=6", "train.checkpoint_every=6", "eval.val_episodes=10",
            "eval.episodes=20", "eval.batch_size=10", "logging.wandb=false"]


def main(argv=None, trainer_class=Trainer, debug=debug_overrides, description=__doc__) -> int:
    """The command: ``trainer_class`` trains (fsl-pretrain passes its Pretrainer, its own
    ``debug`` overrides and its --help text)."""
    args = parse_args(argv, description)
    dist = trainer = None
    try:
        cfg = load_config(args.config, (debug() if args.debug else []) + args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
        if args.debug:
            torch.autograd.set_detect_anomaly(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        dist = Distributed(log_with_wandb=cfg.logging.wandb,
                           log_with_tensorboard=cfg.logging.tensorboard, project_dir=str(run_dir))
        trainer = trainer_class(cfg, dist, run_dir, resume=args.resume, overwrite=args.overwrite,
                                debug=args.debug, quiet=args.quiet,
                                allow_config_change=args.allow_config_change)
        trainer.stop_on_signals()
        outcome = trainer.fit()
        # Python restores default handlers while it shuts down; a late USR1 (sent to every rank
        # by a batch script) would then kill a rank that already stopped cleanly.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        stopped = outcome["stopped_early"] and not outcome["diverged"]
        if stopped:
            # The one line of a stop, as soon as the checkpoint is there: a launcher that passed
            # the signal on may kill this process before finish() is done (accelerate's: 5 s).
            dist.print(stop_line(outcome["step"], cfg.train.steps, outcome["checkpoint"]),
                       flush=True)
        result = trainer.finish(export=outcome["diverged"] is None)
    except Exception as err:
        code = exit_code(err)
        if code is None and not args.traceback and trainer is not None and trainer.stop.requested:
            quit_after_peer(trainer)
        if code is None or args.traceback:
            raise
        report(err, dist)
        if isinstance(err, WriteFailure) and trainer is not None:
            trainer.close()  # raised on every rank alike: the trackers can end in step
        return dist.exit(code) if dist is not None else code
    if stopped:
        # No interpreter teardown, on one process as on several (dist.exit): after accelerate's
        # launcher stopped W&B's service with us, W&B's exit hook printed a traceback.
        quit_now("", EXIT_STOPPED)
    return dist.exit(summarise(outcome, result, cfg, run_dir, dist))


def quit_after_peer(trainer) -> None:
    """A stop signal came, and then a collective failed: another rank was still starting when
    the signal reached it and quit at once (interrupted_while_starting), as this one had just
    set its stop handler. The failure follows from the stop: one line (main rank), no
    traceback, exit 128 + signal."""
    signum = trainer.stop.signum
    what = "interrupted" if signum == signal.SIGINT else "stopped by a signal"
    newest = latest_checkpoint(trainer.run_dir)
    where = f"--resume auto continues from {newest.name}" if newest else "nothing was saved"
    line = f"fsl_dist: {what} as the run started; {where}"
    quit_now(line if trainer.dist.is_main else "", 128 + signum)


def summarise(outcome: dict, result, cfg, run_dir: Path, dist) -> int:
    """The closing lines of a run that was not stopped by a signal, and its exit code."""
    if outcome["skipped_steps"]:
        dist.print(f"{outcome['skipped_steps']} of {outcome['step']} steps were skipped "
                   "(non-finite gradients or losses)")
    if outcome["diverged"]:
        dist.print(f"error: {outcome['diverged']}", file=sys.stderr)
        return EXIT_DIVERGED
    if result is not None:
        method = "" if result.get("method", "adapt") == "adapt" else f" ({result['method']})"
        dist.print(f"{cfg.name}: {cfg.eval.part} accuracy{method} {result['mean']:.2f} ± "
                   f"{result['ci95']:.2f}% over {result['episodes']} episodes -> "
                   f"{run_dir / 'eval.json'}")
    return 0


def command() -> NoReturn:
    """`fsl-train`: main(), then the end of the process (signals.leave says why)."""
    leave(main())


if __name__ == "__main__":
    command()
