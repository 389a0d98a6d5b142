"""Pre-train a backbone by supervised classification over every class of the train part, on one
process or many; validated by nearest centroid on val episodes (fsl_dist/pretrain.py).

    accelerate launch launch/pretrain.py --config configs/pretrain/omniglot_cnn.yaml
    fsl-pretrain --config pretrain/omniglot_cnn train.steps=2000          # installed
    accelerate launch --multi_gpu --num_processes 2 launch/pretrain.py --config pretrain/omniglot_cnn
    accelerate launch launch/pretrain.py --config pretrain/omniglot_cnn --resume auto
    fsl-train --config cnn_maml model.init_from=runs/omniglot_cnn-0      # then: any family from it
    fsl-evaluate --run-dir runs/omniglot_cnn-0 --method finetune-cosine  # or test its backbone

Options, overrides and exit codes are fsl-train's: the run folder (runs/<config name>-<seed>),
--resume auto, --overwrite, stop signals. The exported model is the best validated step's
(pretrain.json says which); eval.json is its nearest-centroid accuracy on eval.part.
"""  # noqa: E501 (the --help text)

from __future__ import annotations

import os
from typing import NoReturn

from fsl_dist.cli.starting import restart_for_cpu_training

if __name__ == "__main__":  # python -m (fsl-pretrain and launch/pretrain.py do it first)
    restart_for_cpu_training()

# Importing fsl_dist.cli.train installs the early Ctrl-C handler before torch is imported.
from fsl_dist.cli import train  # noqa: E402
from fsl_dist.signals import leave  # noqa: E402


def debug_overrides() -> list[str]:
    """Debug mode: a few steps on a small batch, W&B off, every step printed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return ["train.steps=6", f"pretrain.batch_size={8 * world}", "pretrain.norm_group=8",
            "train.log_every=1", "train.eval_every=6", "train.checkpoint_every=6",
            "eval.val_episodes=10", "eval.episodes=20", "eval.batch_size=10",
            "logging.wandb=false"]


def main(argv=None) -> int:
    from fsl_dist.pretrain import Pretrainer

    return train.main(argv, trainer_class=Pretrainer, debug=debug_overrides,
                      description=__doc__)


def command() -> NoReturn:
    """`fsl-pretrain`: main(), then the end of the process (signals.leave says why)."""
    leave(main())


if __name__ == "__main__":
    command()
