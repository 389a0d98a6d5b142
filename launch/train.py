"""Meta-train a config, on one process or many (the code: fsl_dist/cli/train.py, `fsl-train`).

    accelerate launch launch/train.py --config configs/resnet_boil.yaml
    accelerate launch --multi_gpu --num_processes 8 launch/train.py --config configs/cnn_maml.yaml train.seed=3
    python launch/train.py --config configs/cnn_maml.yaml --debug          # one process, a few steps
    accelerate launch launch/train.py --config configs/cnn_maml.yaml --resume auto
"""  # noqa: E501 (the usage lines)

from fsl_dist.cli.starting import restart_for_cpu_training

if __name__ == "__main__":
    restart_for_cpu_training()  # on CPU: again, under glibc's start-up tunables (cpu_malloc.py)

# Importing the module installs its early Ctrl-C handler, before it imports torch.
from fsl_dist.cli.train import command  # noqa: E402

if __name__ == "__main__":
    command()
