"""The outer learning-rate schedule: its values, and that the trainer applies them step by step."""

from __future__ import annotations

import json

import pytest
import torch

from fsl_dist.config import ConfigError, OptimConfig, load_config
from fsl_dist.trainer import outer_lr

from launching import ROOT, run
from training_runs import TINY, max_abs_difference, train, weights


def test_cosine_falls_from_lr_to_min_lr_and_stays_there():
    optim = OptimConfig(lr=1e-3, schedule="cosine", min_lr=1e-4)
    assert outer_lr(optim, 0, 100) == 1e-3
    assert outer_lr(optim, 50, 100) == pytest.approx(5.5e-4, rel=1e-12)
    assert outer_lr(optim, 100, 100) == pytest.approx(1e-4, rel=1e-12)
    assert outer_lr(optim, 250, 100) == pytest.approx(1e-4, rel=1e-12)  # resumed with more steps
    falling = [outer_lr(optim, s, 100) for s in range(101)]
    assert all(a > b for a, b in zip(falling, falling[1:]))


def test_cosine_is_mamlpp_annealing_as_torch_computes_it():
    """MAML++'s reference code anneals with torch's CosineAnnealingLR (eta_min = its
    min_learning_rate 1e-5, from meta_learning_rate 1e-3), stepped once per epoch over
    total_epochs; here the same curve is stepped once per training step over train.steps."""
    optim, total = OptimConfig(lr=1e-3, schedule="cosine", min_lr=1e-5), 150
    weight = torch.zeros(1, requires_grad=True)
    adam = torch.optim.Adam([weight], lr=optim.lr)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=total, eta_min=1e-5)
    for step in range(total + 1):
        assert outer_lr(optim, step, total) == pytest.approx(adam.param_groups[0]["lr"],
                                                              rel=1e-9), step
        adam.step()
        reference.step()


def test_constant_is_the_default():
    assert OptimConfig().schedule == "constant"


def test_constant_ignores_the_step():
    assert {outer_lr(OptimConfig(lr=3e-4), s, 10) for s in (0, 5, 10, 99)} == {3e-4}


def test_step_schedule_multiplies_the_rate_after_each_listed_step():
    optim = OptimConfig(lr=1e-3, schedule="step", decay_at=[3, 5], decay_factor=0.5)
    assert [outer_lr(optim, s, 100) for s in range(7)] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4], rel=1e-12)


@pytest.mark.parametrize("overrides, named", [
    (["optim.schedule=step"], "optim.decay_at"),
    (["optim.decay_at=[100]"], "optim.decay_at"),
    (["optim.schedule=step", "optim.decay_at=[200, 100]"], "optim.decay_at"),
    (["optim.schedule=step", "optim.decay_at=[0]"], "optim.decay_at"),
    (["optim.schedule=step", "optim.decay_at=[100]", "optim.decay_factor=2"], "optim.decay_factor"),
])
def test_a_step_schedule_that_cannot_work_is_named(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(ROOT / "configs" / "cnn_maml.yaml", overrides)


@pytest.mark.integration
def test_constant_run_resumed_with_a_step_decay_equals_the_step_schedule_from_the_start(
        packed, tmp_path):
    """The recipe of a RESULTS.md row: train at a constant rate, then resume the checkpoint with
    the rate decayed from that step on. It must be the same run as the one-config step schedule."""
    shards, decay = packed("futurama"), ["optim.schedule=step", "optim.decay_at=[2]"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(whole, shards, 0, *decay)
    train(parts, shards, 0, "train.steps=2")
    train(parts, shards, 0, *decay, "--resume", "auto")
    a, b = weights(whole), weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_abs_difference(a, b):.3g}"
    rows = [json.loads(line) for line in (parts / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows if "train/loss" in row] == pytest.approx(
        [1e-3, 1e-3] + [1e-4] * 4, rel=1e-12)


@pytest.mark.integration
def test_the_trainer_steps_with_the_scheduled_learning_rate(packed, tmp_path):
    run_dir = tmp_path / "run"
    run("train.py", ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--run-dir", str(run_dir),
                     f"data.shards={packed('futurama')}", *TINY,
                     "optim.schedule=cosine", "optim.min_lr=1e-4"], processes=0)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"]: row["lr"] for row in rows if "train/loss" in row}
    optim = OptimConfig(lr=1e-3, schedule="cosine", min_lr=1e-4)
    # the row of step s logs the rate of the update that made it: the one after s - 1 steps
    assert logged == pytest.approx({s: outer_lr(optim, s - 1, 6) for s in range(1, 7)}, rel=1e-12)
