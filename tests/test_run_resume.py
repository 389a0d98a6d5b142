"""A run is one run (issue 38): `--resume auto` never silently starts over a run or replaces a
finished one, a resume never silently changes what the run trains, and a stop during
validation keeps the finished step. Real trainer processes on real Omniglot shards; the faults'
lines and exit codes are rows of tests/faults.py (docs/faults.md)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faulting import (
    assert_fault,
    interrupt_launcher,
    metric_steps,
    snapshot,
    train,
    train_args,
    wait_for,
)
from faults import BY_KEY

from fsl_dist.data import shards as shard_sets
from fsl_dist.exits import EXIT_RESUMABLE

from launching import ROOT, child_env, command, run


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A finished 4-step MAML run (checkpoints at 2 and 4): copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = train(run_dir, shards)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


# ---------------------------------------------------------------- no checkpoint to resume from


def test_resume_auto_refuses_a_finished_run_without_checkpoints(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    before = snapshot(run_dir)
    result = train(run_dir, shards_of(finished), "--resume", "auto", steps=6)
    assert_fault(result, "resume_finished_no_checkpoint")
    assert "--overwrite" in result.stderr
    assert snapshot(run_dir) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing moved aside either


def test_resume_auto_starts_over_a_run_stopped_before_its_first_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    # an attempt that logged two steps and died before its first checkpoint (at step 4)
    first = train(run_dir, shards, "train.checkpoint_every=4", steps=2)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("checkpoints", "model.safetensors", "model.yaml", "eval.json"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    before = snapshot(run_dir)
    assert metric_steps(run_dir) == [1, 2]

    again = train(run_dir, shards, "--resume", "auto", steps=3)
    assert_fault(again, "resume_started_over")
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert f"moved to {aside}" in again.stdout
    assert snapshot(aside) == before
    assert metric_steps(run_dir) == [1, 2, 3]  # the new run's rows alone
    assert "resumed from" not in again.stdout


# ---------------------------------------------------------------- a changed config


def shards_of(run_dir: Path) -> Path:
    return Path(run_json_config(run_dir)["data"]["shards"])


def run_json_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


@pytest.mark.parametrize("overrides, named", [
    (("algorithm.name=boil", "train.meta_batch_size=4"),
     ['algorithm.name "maml" -> "boil"', "train.meta_batch_size 2 -> 4"]),
    (("train.seed=1", "optim.lr=0.01"), ["train.seed 0 -> 1", "optim.lr 0.001 -> 0.01"]),
], ids=["algorithm", "seed-lr"])
def test_a_resume_that_changes_what_is_trained_is_refused(finished, tmp_path, overrides, named):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    result = train(run_dir, shards_of(finished), "--resume", "auto", *overrides, steps=6)
    assert_fault(result, "resume_config_changed")
    for change in named:
        assert change in result.stderr
    assert "--allow-config-change" in result.stderr
    assert snapshot(run_dir) == before


def test_an_allowed_config_change_continues_and_is_recorded_with_its_step(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    result = train(run_dir, shards_of(finished), "--resume", "auto", "--allow-config-change",
                   "algorithm.name=boil", steps=6)
    assert_fault(result, "resume_config_allowed")
    assert "at step 4" in result.stdout
    changes = run_json(run_dir)["config_changes"]
    assert {"key": "algorithm.name", "old": "maml", "new": "boil", "kind": "trained",
            "step": 4} in changes
    assert {"key": "train.steps", "old": 4, "new": 6, "kind": "bookkeeping",
            "step": 4} in changes
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert [s["step"] for s in run_json(run_dir)["segments"]] == [0, 4]

    # evaluate and compare show it
    evaluation = run("evaluate.py", ["--run-dir", str(run_dir), "--episodes", "10"])
    assert 'algorithm.name "maml" -> "boil" at step 4' in evaluation.stderr
    assert json.loads((run_dir / "eval-test.json").read_text())["config_changes"] == changes
    table = run("compare.py", [str(run_dir), "--plot", str(tmp_path / "c.png")])
    assert 'run: config changed on resume: ' in table.stdout
    assert 'algorithm.name "maml" -> "boil" at step 4' in table.stdout


def test_the_readmes_resumes_pass_and_are_recorded(finished, tmp_path):
    """Extending train.steps, and a step decay at the resume step (the finished steps keep
    their rates, so the run is that schedule's run from the start): no flag needed."""
    run_dir = copy_of(finished, tmp_path)
    result = train(run_dir, shards_of(finished), "--resume", "auto", "optim.schedule=step",
                   "optim.decay_at=[4]", steps=6)
    assert_fault(result, "resume_steps_extended")
    keys = {c["key"]: c for c in run_json(run_dir)["config_changes"]}
    assert {"train.steps", "optim.schedule", "optim.decay_at"} <= set(keys)
    assert keys["optim.decay_at"]["step"] == 4 and keys["optim.decay_at"]["new"] == [4]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert rates[4] == pytest.approx(1e-3) and rates[5] == pytest.approx(1e-4)

    # a decay before the resume step would rewrite the finished steps' rates: refused
    before = snapshot(run_dir)
    rewrite = train(run_dir, shards_of(finished), "--resume", "auto", "optim.decay_at=[2]",
                    "optim.schedule=step", steps=8)
    assert_fault(rewrite, "resume_config_changed")
    assert "optim.decay_at [4] -> [2]" in rewrite.stderr
    assert snapshot(run_dir) == before


def test_resuming_on_shards_of_another_image_size_names_the_shards(finished, omniglot_source,
                                                                   tmp_path):
    run_dir = copy_of(finished, tmp_path)
    other = shard_sets.pack_omniglot(omniglot_source, "futurama", tmp_path / "shards-20",
                                     size=20, download=False)
    before = snapshot(run_dir)
    result = train(run_dir, other, "--resume", "auto", steps=6)
    assert_fault(result, "resume_other_image_size")
    assert f"the shards at {other}" in result.stderr
    assert "image_size 28 (trained) vs 20 (shards)" in result.stderr
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- a stop during validation


def test_a_stop_during_validation_keeps_the_finished_step(shards, tmp_path):
    """SIGINT to accelerate's launcher while a single process validates at step 2 (before the
    first checkpoint, due at 4): the launcher kills 5 s after passing the signal on, and the
    validation (500 episodes) takes longer. The trainer saves step 2 at once, marked as
    validation pending; the resume validates first and continues, each step logged once."""
    run_dir = tmp_path / "run"
    args = train_args(run_dir, shards, "train.checkpoint_every=4", "train.eval_every=2",
                      "eval.val_episodes=500", steps=4)
    launcher, stdout, stderr = interrupt_launcher(
        args, lambda: run_dir.joinpath("metrics.jsonl").is_file() and 2 in metric_steps(run_dir),
        what="step 2's row")
    fault = BY_KEY["stop_in_validation"]
    assert launcher.returncode == fault.code, stdout + stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert f"{fault.seen} 2 of 4" in stdout, stdout + stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002.pt"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "val/acc" in r]  # the validation was cut short

    resumed = train(run_dir, shards, "--resume", "auto", "train.checkpoint_every=4",
                    "train.eval_every=2", steps=4)  # eval.val_episodes=4: cheap, recorded
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/acc" in r] == [2, 4]


def test_a_stop_during_the_final_evaluation_says_so_and_the_resume_evaluates_again(
        shards, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, shards, "eval.episodes=500", steps=2)
    # 0.3 s after the export: into the evaluation, which takes longer than the launcher's 5 s
    launcher, stdout, stderr = interrupt_launcher(
        args, lambda: (run_dir / "model.yaml").is_file(), what="the exported model", after=0.3)
    fault = BY_KEY["stop_in_final_evaluation"]
    assert launcher.returncode == fault.code, stdout + stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert f"{fault.seen} of step 2 of 2" in stdout, stdout + stderr[-3000:]
    assert not (run_dir / "eval.json").exists()
    assert (run_dir / "checkpoints" / "step-00000002.pt").is_file()

    resumed = train(run_dir, shards, "--resume", "auto", steps=2)  # eval.episodes=10
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "eval.json").read_text())["episodes"] == 10
    assert metric_steps(run_dir) == [1, 2]


def test_kill_during_the_final_evaluation_of_a_plain_process_stops_it_there(shards, tmp_path):
    """`python launch/train.py` with no launcher: nothing read the stop flag during the held-out
    evaluation, so `kill` waited for all of it (minutes for a 20-way evaluation)."""
    run_dir = tmp_path / "run"
    trainer = subprocess.Popen(command("train.py", train_args(run_dir, shards, "eval.episodes=2000",
                                                              steps=2), 0),
                               cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / "model.yaml").is_file(), what="the exported model")
        time.sleep(0.3)
        trainer.send_signal(signal.SIGTERM)
        stdout, stderr = trainer.communicate(timeout=30)  # the whole evaluation takes minutes
    finally:
        if trainer.poll() is None:
            trainer.kill()
    fault = BY_KEY["stop_in_final_evaluation"]
    assert trainer.returncode == EXIT_RESUMABLE, stdout + stderr[-3000:]  # no launcher's 130
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert f"{fault.seen} of step 2 of 2" in stdout, stdout + stderr[-3000:]
    assert not (run_dir / "eval.json").exists()


def test_evaluating_a_run_still_training_says_so(shards, tmp_path):
    run_dir = tmp_path / "run"
    trainer = subprocess.Popen(command("train.py", train_args(
        run_dir, shards, "train.keep_checkpoints=400", steps=400), 0),
                               cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step-00000002.pt").is_file(), what="step 2")
        evaluation = run("evaluate.py", ["--run-dir", str(run_dir), "--checkpoint", "latest",
                                         "--episodes", "10"], check=False)
    finally:
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(timeout=120)
    assert_fault(evaluation, "evaluate_in_progress")
    assert "stopped early" not in evaluation.stderr
    assert json.loads((run_dir / "eval-test.json").read_text())["training_in_progress"] is True
