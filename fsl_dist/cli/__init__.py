"""fsl_dist's commands, one module each with ``main(argv=None) -> int``; installed as console
commands, run as ``python -m fsl_dist.cli.<name>``, or through the checkout's launch/ scripts:

    fsl-train      fsl_dist.cli.train        meta-train a config (accelerate launch -m fsl_dist.cli.train)
    fsl-pretrain   fsl_dist.cli.pretrain     supervised pre-training of a backbone (fsl_dist/pretrain.py)
    fsl-evaluate   fsl_dist.cli.evaluate     held-out accuracy of a run folder
    fsl-predict    fsl_dist.cli.predict      classify query images with a trained run
    fsl-sweep      fsl_dist.cli.sweep        configs x seeds as a SLURM array job
    fsl-compare    fsl_dist.cli.compare      tables and learning curves of several runs
    fsl-multinode  fsl_dist.cli.multinode    one machine's share of a multi-node SLURM run
    fsl-pack       fsl_dist.data.pack_cli    pack a data set into WebDataset shards
    fsl-bench      fsl_dist.bench.cli        meta-step speed and memory against the peers
"""  # noqa: E501 (the table)

from __future__ import annotations

from pathlib import Path

# The project checkout this package lies in; installed from a wheel, a folder without launch/.
CHECKOUT = Path(__file__).resolve().parents[2]


def train_script() -> Path:
    """The script the SLURM commands start under `accelerate launch`: the checkout's
    launch/train.py (the batch scripts and the supervisor's process search name it), else, when
    installed from a wheel, this package's train module by its file."""
    in_checkout = CHECKOUT / "launch" / "train.py"
    return in_checkout if in_checkout.is_file() else Path(__file__).resolve().with_name("train.py")
