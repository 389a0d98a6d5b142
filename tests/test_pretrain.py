"""Supervised pre-training through real processes on real Omniglot shards (fsl-pretrain): two
gloo ranks give the one-process run, a run resumed from a checkpoint ends bitwise as the
uninterrupted one, `model.init_from` starts a model from exactly the pre-trained body, and the
frozen-backbone evaluation methods evaluate it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fsl_dist.checkpoint import checkpoint_path, load_checkpoint

from launching import ROOT, run

# Tiny but real: Conv-4 of width 8, batches of 16 images in batch-norm groups of 4, validated
# every 2 steps on 4 val episodes (so the best of steps 2, 4 and 6 is exported).
TINY = ["model.width=8", "pretrain.batch_size=16", "pretrain.norm_group=4", "train.steps=6",
        "train.checkpoint_every=2", "train.eval_every=2", "train.log_every=1",
        "eval.val_episodes=4", "eval.episodes=10", "eval.batch_size=10", "logging.wandb=false",
        "task.k_shot=1", "task.q_query=2", "data.split=futurama"]


def pretrain(run_dir: Path, shards: Path, processes: int, *extra: str, **kw):
    args = ["--config", str(ROOT / "configs" / "pretrain" / "omniglot_cnn.yaml"),
            "--run-dir", str(run_dir), f"data.shards={shards}", *TINY, *extra]
    return run("pretrain.py", args, processes=processes, **kw)


def last_weights(run_dir: Path) -> dict:
    """The weights of the run's last step (its newest checkpoint's model)."""
    return load_checkpoint(checkpoint_path(run_dir, 6))["model"]


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory) -> Path:
    """An uninterrupted one-process pre-training: the reference of every test here."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    pretrain(run_dir, shards, 0)
    return run_dir


def test_two_ranks_give_the_weights_of_one_process(shards, one_process, tmp_path):
    two = tmp_path / "two"
    pretrain(two, shards, 2)
    info = json.loads((two / "run.json").read_text())
    assert (info["world_size"], info["backend"]) == (2, "gloo")
    difference = max_abs_difference(last_weights(one_process), last_weights(two))
    assert difference < 1e-6, f"max |one - two| = {difference:.3g}"
    # the same best validated step is exported, with the same weights
    summaries = [json.loads((d / "pretrain.json").read_text()) for d in (one_process, two)]
    assert summaries[0]["step"] == summaries[1]["step"]
    assert max_abs_difference(load_file(str(one_process / "model.safetensors")),
                              load_file(str(two / "model.safetensors"))) < 1e-6


def test_a_resumed_run_ends_bitwise_as_the_uninterrupted_one(shards, one_process, tmp_path):
    """From the step-2 checkpoint of the reference (validated there, so the best so far is in
    it), in a new folder: the same last weights, the same exported model and summary."""
    resumed = tmp_path / "resumed"
    pretrain(resumed, shards, 0, "--resume", str(checkpoint_path(one_process, 2)))
    a, b = last_weights(one_process), last_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_abs_difference(a, b):.3g}"
    exported = [load_file(str(d / "model.safetensors")) for d in (one_process, resumed)]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    assert ((one_process / "pretrain.json").read_text()
            == (resumed / "pretrain.json").read_text())
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 4, 5, 6]
