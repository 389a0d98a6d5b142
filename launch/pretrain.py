"""Pre-train a backbone by supervised classification (the code: fsl_dist/cli/pretrain.py,
`fsl-pretrain`).

    accelerate launch launch/pretrain.py --config configs/pretrain/omniglot_cnn.yaml
    accelerate launch --multi_gpu --num_processes 2 launch/pretrain.py --config configs/pretrain/omniglot_cnn.yaml
    accelerate launch launch/pretrain.py --config configs/pretrain/omniglot_cnn.yaml --resume auto
"""  # noqa: E501 (the usage lines)

from fsl_dist.cli.starting import restart_for_cpu_training

if __name__ == "__main__":
    restart_for_cpu_training()  # on CPU: again, under glibc's start-up tunables (cpu_malloc.py)

# Importing the module installs its early Ctrl-C handler, before it imports torch.
from fsl_dist.cli.pretrain import command  # noqa: E402

if __name__ == "__main__":
    command()
