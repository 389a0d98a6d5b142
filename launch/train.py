"""Meta-train a config, on one process or many (the code: fsl_dist/cli/train.py, `fsl-train`).

    accelerate launch launch/train.py --config configs/resnet_boil.yaml
    accelerate launch --multi_gpu --num_processes 8 launch/train.py --config configs/cnn_maml.yaml train.seed=3
    python launch/train.py --config configs/cnn_maml.yaml --debug          # one process, a few steps
    accelerate launch launch/train.py --config configs/cnn_maml.yaml --resume auto
"""  # noqa: E501 (the usage lines)

# Importing the module installs its early Ctrl-C handler, before it imports torch.
from fsl_dist.cli.train import command

if __name__ == "__main__":
    command()
