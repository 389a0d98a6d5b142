"""Evaluate a trained run folder on held-out episodes (the code: fsl_dist/cli/evaluate.py,
`fsl-evaluate`).

    python launch/evaluate.py --run-dir runs/cnn_maml-0 --episodes 600
    accelerate launch --multi_gpu --num_processes 2 launch/evaluate.py --run-dir runs/cnn_maml-0
"""

from fsl_dist.cli.evaluate import command

if __name__ == "__main__":
    command()
