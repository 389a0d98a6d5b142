"""The end of training validates only where `train.eval_every` says (or with `eval.final_val`):
a short smoke run does not wait for a validation it did not ask for."""

from __future__ import annotations

import json

import pytest

from fsl_dist.config import load_config
from fsl_dist.trainer import validates_at

from launching import ROOT, run


def steps_validated(*overrides: str) -> list[int]:
    cfg = load_config(ROOT / "configs" / "cnn_maml.yaml", list(overrides))
    return [s for s in range(1, cfg.train.steps + 1) if validates_at(s, cfg)]


def test_validation_follows_eval_every_and_the_last_step_only_with_final_val():
    assert steps_validated("train.steps=10") == []  # a smoke run: eval_every is 250
    assert steps_validated("train.steps=10", "eval.final_val=true") == [10]
    assert steps_validated("train.steps=7", "train.eval_every=3") == [3, 6]
    assert steps_validated("train.steps=7", "train.eval_every=3", "eval.final_val=true") == [3, 6,
                                                                                           7]
    assert steps_validated("train.steps=6", "train.eval_every=3", "eval.final_val=true") == [3, 6]


@pytest.mark.integration
def test_a_run_ending_between_validations_goes_straight_to_the_held_out_evaluation(packed,
                                                                                   tmp_path):
    run_dir = tmp_path / "run"
    run("train.py", ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--run-dir",
                     str(run_dir), f"data.shards={packed('futurama')}", "task.k_shot=1",
                     "task.q_query=2", "train.meta_batch_size=2", "model.width=8",
                     "train.steps=3", "train.eval_every=2", "train.checkpoint_every=3",
                     "eval.episodes=4", "eval.val_episodes=4", "eval.batch_size=4",
                     "eval.inner_steps=1", "logging.wandb=false"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/acc" in r] == [2]
    assert [r["step"] for r in rows if "test/acc" in r] == [3]
