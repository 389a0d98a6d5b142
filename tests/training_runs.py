"""Tiny trainer runs through tests/launching.py and the comparison of their weights, for the
tests that set one process against two ranks, two nodes or a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from launching import ROOT, run

# Tiny but real: Conv-4 of width 8 on 5-way 1-shot tasks from the packed Futurama split.
TINY = ["model.width=8", "task.k_shot=1", "task.q_query=2", "train.meta_batch_size=4",
        "train.steps=6", "train.checkpoint_every=2", "train.eval_every=6", "train.log_every=1",
        "eval.episodes=10", "eval.val_episodes=4", "eval.batch_size=10", "eval.inner_steps=1",
        "logging.wandb=false"]


def train(run_dir: Path, shards: Path, processes: int, *extra: str, config="cnn_maml", **kw):
    args = ["--config", str(ROOT / "configs" / f"{config}.yaml"), "--run-dir", str(run_dir),
            f"data.shards={shards}", *TINY, *extra]
    return run("train.py", args, processes=processes, **kw)


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model.safetensors"))


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def assert_world(run_dir: Path, world_size: int) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == world_size
    assert info["backend"] == ("gloo" if world_size > 1 else info["backend"])
