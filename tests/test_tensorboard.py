"""TensorBoard as a second tracker (logging.tensorboard=true): event files in <run-dir>/tensorboard/
whose scalars, read back with TensorBoard's own event reader, are metrics.jsonl's; the config as
flat hyperparameters of the same run; a resumed run hides what it repeats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fsl_dist.distributed import TENSORBOARD_DIR, Distributed, flat_hparams
from fsl_dist.tracking import read_metrics
from fsl_dist.wandb_offline import find_run_files, read_run

from launching import config_args, run


def read_tensorboard(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})  # 0: keep every event
    events.Reload()
    return events


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, checking that no step of a tag holds two values."""
    events = read_tensorboard(log_dir)
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        scalars[tag] = {p.step: p.value for p in points}
        assert len(scalars[tag]) == len(points), f"{tag}: a step logged twice"
    return scalars


def metrics_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tag -> {step: value} (rows of one step hold different keys)."""
    scalars: dict[str, dict[int, float]] = {}
    for row in read_metrics(run_dir):
        for tag, value in row.items():
            if tag != "step":
                assert row["step"] not in scalars.setdefault(tag, {}), (tag, row["step"])
                scalars[tag][row["step"]] = value
    return scalars


def assert_same_scalars(tensorboard: dict, metrics: dict) -> None:
    assert set(tensorboard) == set(metrics)
    for tag, by_step in metrics.items():
        assert set(tensorboard[tag]) == set(by_step), tag
        for step, value in by_step.items():
            # TensorBoard keeps scalars as float32: equal after that rounding, no tolerance
            stored, expected = tensorboard[tag][step], float(np.float32(value))
            assert stored == expected or (math.isnan(stored) and math.isnan(expected)), (
                tag, step, stored, value)


def logged_hparams(log_dir: Path) -> dict:
    content = read_tensorboard(log_dir).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    return {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for name, value in start.hparams.items()}


# ------------------------------------------------------------------ in process


def test_flat_hparams_makes_dotted_keys_and_text_of_lists():
    config = {"name": "x", "optim": {"lr": 0.01, "betas": [0.9, 0.99], "grad_clip": None},
              "train": {"steps": 5, "tune": True}}
    assert flat_hparams(config) == {"name": "x", "optim.lr": 0.01, "optim.betas": "[0.9, 0.99]",
                                    "optim.grad_clip": None, "train.steps": 5,
                                    "train.tune": True}


def test_resumed_session_hides_the_steps_it_repeats(tmp_path):
    """Session one logs steps 1-3; a session resumed at step 1 logs 2-3 again: TensorBoard
    shows step 1 of the first and steps 2-3 of the second, one value per step."""
    config = {"optim": {"lr": 0.5, "betas": [0.9, 0.999]}, "train": {"steps": 3}}
    for resumed_at, offset in ((0, 0.0), (1, 10.0)):
        dist = Distributed(log_with_tensorboard=True, project_dir=str(tmp_path))
        dist.start_trackers("fsl_dist", config, {}, resumed_at=resumed_at)
        for step in range(resumed_at + 1, 4):
            dist.log({"train/loss": step + offset}, step=step)
        dist.end()
    assert tensorboard_scalars(tmp_path / TENSORBOARD_DIR) == {
        "train/loss": {1: 1.0, 2: 12.0, 3: 13.0}}
    assert logged_hparams(tmp_path / TENSORBOARD_DIR) == {
        "optim.lr": 0.5, "optim.betas": "[0.9, 0.999]", "train.steps": 3.0}
    # the event files only: no timestamped sub-runs, no hparams.yml
    assert all(p.name.startswith("events.out.tfevents.")
               for p in (tmp_path / TENSORBOARD_DIR).iterdir())


# ------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


@pytest.mark.integration
def test_a_run_writes_metrics_jsonl_scalars_as_tensorboard_events(shards, tmp_path):
    run_dir = tmp_path / "cnn_maml"
    run("train.py", config_args("cnn_maml", run_dir, shards, "logging.tensorboard=true",
                                "logging.wandb=false"))
    assert not (run_dir / "wandb").exists()
    metrics = metrics_scalars(run_dir)
    assert {"train/loss", "val/acc", "test/acc", "perf/tasks_per_s"} <= set(metrics)
    assert_same_scalars(tensorboard_scalars(run_dir / TENSORBOARD_DIR), metrics)
    hparams = logged_hparams(run_dir / TENSORBOARD_DIR)
    assert hparams["model.name"] == "cnn" and hparams["train.steps"] == 2
    assert hparams["logging.tensorboard"] == 1  # a bool is a number to TensorBoard


@pytest.mark.integration
def test_wandb_and_tensorboard_together_through_a_resume(shards, tmp_path):
    """Both trackers on; the finished run resumed from its step-1 checkpoint repeats step 2:
    TensorBoard ends as metrics.jsonl (the repeated step's rows replaced), W&B has its rows."""
    run_dir = tmp_path / "cnn_maml"
    args = config_args("cnn_maml", run_dir, shards, "logging.tensorboard=true")
    run("train.py", args)
    first = tensorboard_scalars(run_dir / TENSORBOARD_DIR)
    run("train.py", [*args, "--resume", str(run_dir / "checkpoints" / "step-00000001.pt")])
    metrics = metrics_scalars(run_dir)
    tensorboard = tensorboard_scalars(run_dir / TENSORBOARD_DIR)
    assert_same_scalars(tensorboard, metrics)
    # the step-2 row is the resumed session's: its timing differs from the first session's
    assert tensorboard["perf/elapsed_s"][2] != first["perf/elapsed_s"][2]
    assert len(list((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2

    # W&B alongside: one offline file per session, one W&B run, the resumed rows in the second
    first_session, resumed = (read_run(p) for p in find_run_files(run_dir))
    assert first_session["meta"]["id"] == resumed["meta"]["id"] == json.loads(
        (run_dir / "run.json").read_text())["wandb_id"]
    assert [h["train/loss"] for h in resumed["history"] if "train/loss" in h] == pytest.approx(
        [metrics["train/loss"][2]], rel=1e-6)
    assert [h["test/acc"] for h in resumed["history"] if "test/acc" in h] == pytest.approx(
        [metrics["test/acc"][2]], rel=1e-6)
