"""Supervised pre-training through real processes on real Omniglot shards (fsl-pretrain): two
gloo ranks give the one-process run, a run stopped and resumed ends bitwise as the
uninterrupted one, `model.init_from` starts a model from exactly the pre-trained body, and the
frozen-backbone evaluation methods evaluate it (fsl-evaluate's default by nearest centroid).
tests/test_predict_pretrained.py checks the model's description and prediction in-process."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from faulting import assert_fault, train, wait_for
from safetensors.torch import load_file

from fsl_dist.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint
from fsl_dist.config import load_config
from fsl_dist.data.shards import load_manifest
from fsl_dist.distributed import Distributed
from fsl_dist.trainer import Trainer

from launching import ROOT, child_env, command, run

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


def test_a_stopped_and_resumed_run_ends_bitwise_as_the_uninterrupted_one(shards, tmp_path):
    """SIGTERM once the step-2 checkpoint exists (the run checkpoints the step it stops at and
    exits 75), then --resume auto: the last weights, the exported best model, pretrain.json and
    the training rows are those of the uninterrupted run."""
    longer = ("train.steps=12", "train.eval_every=4")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    pretrain(whole, shards, 0, *longer)
    args = ["--config", str(ROOT / "configs" / "pretrain" / "omniglot_cnn.yaml"), "--run-dir",
            str(parts), f"data.shards={shards}", *TINY, *longer]
    trainer = subprocess.Popen(command("pretrain.py", args, 0), cwd=ROOT, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: checkpoint_path(parts, 2).is_file(), what="step 2")
    trainer.send_signal(signal.SIGTERM)
    stdout, stderr = trainer.communicate(timeout=120)
    assert trainer.returncode == 75, stderr[-3000:]
    stopped_at = load_checkpoint(latest_checkpoint(parts))["step"]
    assert 2 <= stopped_at < 12, stdout
    pretrain(parts, shards, 0, *longer, "--resume", "auto")
    a, b = (load_checkpoint(checkpoint_path(d, 12))["model"] for d in (whole, parts))
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_abs_difference(a, b):.3g}"
    exported = [load_file(str(d / "model.safetensors")) for d in (whole, parts)]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    assert (whole / "pretrain.json").read_text() == (parts / "pretrain.json").read_text()
    rows = [json.loads(line) for line in (parts / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 13))


# ---------------------------------------------------------------- model.init_from


def test_init_from_loads_exactly_the_pre_trained_body(shards, one_process, tmp_path):
    """A new MAML run with `model.init_from` (the trainer set up in this process) holds the
    exported body bit for bit, and a fresh head of its own N-way."""
    cfg = load_config(ROOT / "configs" / "cnn_maml.yaml",
                      [f"data.shards={shards}", "model.width=8", "logging.wandb=false",
                       f"model.init_from={one_process}"])
    trainer = Trainer(cfg, Distributed(), tmp_path / "run", quiet=True)
    trainer.release_run_folder()
    exported = load_file(str(one_process / "model.safetensors"))
    body = {k: v for k, v in trainer.state.model.state_dict().items()
            if k.startswith("features.")}
    assert body.keys() == {k for k in exported if k.startswith("features.")}
    for name, tensor in body.items():
        assert torch.equal(tensor, exported[name]), name
    assert trainer.state.model.classifier.weight.shape[0] == 5  # the task's head, fresh
    train_classes = load_manifest(shards)["splits"]["train"]["classes"]
    assert exported["classifier.weight"].shape[0] == 4 * train_classes  # each turn a class


def test_a_run_started_from_a_moved_body_still_resumes(shards, one_process, tmp_path):
    """The body is read when a run starts, never on resume: its folder may move meanwhile."""
    body, run_dir = tmp_path / "body", tmp_path / "run"
    shutil.copytree(one_process, body)
    assert train(run_dir, shards, f"model.init_from={body}", steps=2).returncode == 0
    shutil.rmtree(body)
    resumed = train(run_dir, shards, f"model.init_from={body}", "--resume", "auto", steps=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout


def test_init_from_another_architecture_is_refused_in_one_line(shards, one_process, tmp_path):
    result = train(tmp_path / "run", shards, f"model.init_from={one_process}",
                   "model.width=16")
    assert_fault(result, "init_from_mismatch")
    assert "features.0.0.weight [8, 1, 3, 3] there, [16, 1, 3, 3] here" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_a_missing_folder_is_refused_in_one_line(shards, tmp_path):
    result = train(tmp_path / "run", shards, f"model.init_from={tmp_path / 'nowhere'}")
    assert_fault(result, "init_from_missing")


def test_groups_that_two_processes_cannot_share_are_refused(shards, tmp_path):
    """Every rank refuses alike before step 1 (exit 2; accelerate's launcher then reports the
    failed ranks in its own words), and the line is said once."""
    result = pretrain(tmp_path / "run", shards, 2, "pretrain.batch_size=12", check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: `pretrain.batch_size` = 12 in groups of `pretrain.norm_group` = 4 "
                      "gives 3 groups, which 2 processes cannot share equally; set "
                      "pretrain.norm_group to a divisor of 6 (a process's share)"], result.stderr
    assert "exitcode  : 2" in result.stderr and result.returncode != 0
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- evaluating the backbone


@pytest.mark.parametrize("method", ["centroid", "finetune-linear", "finetune-cosine"])
def test_the_pre_trained_body_is_evaluated_by_each_method(one_process, method):
    result = run("evaluate.py", ["--run-dir", str(one_process), "--method", method,
                                 "--episodes", "6", "--quiet"])
    saved = json.loads((one_process / f"eval-test-{method}.json").read_text())
    assert saved["method"] == method and saved["episodes"] == 6 and 0 <= saved["mean"] <= 100
    assert f"test accuracy ({method})" in result.stderr


def test_a_new_head_per_episode_gives_one_result_on_any_process_count(one_process, tmp_path):
    """Baseline's heads are seeded by episode: two gloo ranks, each training the heads of its
    share of the episodes, give the accuracy of one process, to the last bit."""
    results = []
    for processes, name in ((0, "one.json"), (2, "two.json")):
        run("evaluate.py", ["--run-dir", str(one_process), "--method", "finetune-linear",
                            "--episodes", "6", "--quiet", "--out", name], processes=processes)
        results.append(json.loads((one_process / name).read_text()))
    assert results[1]["world_size"] == 2
    assert (results[0]["mean"], results[0]["std"]) == (results[1]["mean"], results[1]["std"])


def test_the_default_evaluation_repeats_the_runs_own_centroid_evaluation(one_process):
    """Without --method a pre-trained run is evaluated by nearest centroid, as fsl-pretrain
    evaluated it at the end (eval.json: the same episodes, so the same numbers)."""
    result = run("evaluate.py", ["--run-dir", str(one_process), "--quiet", "--out",
                                 "default.json"])
    default, own = (json.loads((one_process / name).read_text())
                    for name in ("default.json", "eval.json"))
    assert (default["method"], own["method"]) == ("centroid", "centroid")
    assert (default["mean"], default["std"], default["episodes"]) == (
        own["mean"], own["std"], own["episodes"])
    assert "test accuracy (centroid)" in result.stderr


def test_a_checkpoint_of_a_run_that_never_exported_is_evaluated_as_its_export(one_process,
                                                                             tmp_path):
    """A pre-training stopped before it exported (no model.yaml): ``--checkpoint`` of the step
    it would have exported gives the exported model's evaluation (its head spans the train
    classes, which the run's config alone does not say)."""
    stripped = tmp_path / "run"
    shutil.copytree(one_process, stripped)
    for name in ("model.safetensors", "model.yaml"):
        (stripped / name).unlink()
    step = json.loads((one_process / "pretrain.json").read_text())["step"]
    run("evaluate.py", ["--run-dir", str(stripped), "--checkpoint", str(step), "--quiet",
                        "--out", "checkpoint.json"])
    result, own = (json.loads(path.read_text())
                   for path in (stripped / "checkpoint.json", one_process / "eval.json"))
    assert result["method"] == "centroid"
    assert (result["mean"], result["std"], result["episodes"]) == (
        own["mean"], own["std"], own["episodes"])

