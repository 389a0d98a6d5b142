"""Faults and bad inputs, reproduced as a user meets them (real trainer processes on real
Omniglot shards), each ending in one line, its exit code and nothing lost or mixed (the list:
tests/faults.py, shown in docs/faults.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest
import yaml
from faulting import (
    assert_fault,
    metric_steps,
    mount_tmpfs,
    snapshot,
    train,
    train_args,
    wait_for,
)

from launching import ROOT, child_env, command, run


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


# ---------------------------------------------------------------- the run folder


def test_a_finished_run_prints_its_folder_first_and_cannot_be_started_over(shards, tmp_path):
    run_dir = tmp_path / "run"
    first = train(run_dir, shards)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.splitlines()[0] == f"run folder: {run_dir}"
    before = snapshot(run_dir)

    again = train(run_dir, shards)
    assert_fault(again, "occupied")
    assert "--resume auto" in again.stderr and "--overwrite" in again.stderr
    assert snapshot(run_dir) == before


def test_overwrite_moves_the_old_run_aside_whole(shards, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, shards).returncode == 0
    before = snapshot(run_dir)

    again = train(run_dir, shards, "--overwrite", "train.seed=1")
    assert_fault(again, "overwrite")
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert snapshot(aside) == before
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / "eval.json").read_text())["seed"] == 1


def test_a_run_dir_that_is_a_file_is_refused(shards, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    assert_fault(train(target, shards), "run_dir_file")
    assert target.read_text() == "mine\n"


def test_a_second_trainer_is_refused_while_the_first_runs_then_takes_over_its_stale_lock(
        shards, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, shards, steps=400)
    first = subprocess.Popen(command("train.py", args, 0), cwd=ROOT, env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step-00000002.pt").is_file(), what="a "
                 "checkpoint of the first run")
        os.kill(first.pid, signal.SIGSTOP)  # frozen mid-run, holding its lock
        before = snapshot(run_dir)
        second = run("train.py", args + ["--resume", "auto"], check=False)
        assert_fault(second, "busy")
        assert f"PID {first.pid} on host" in second.stderr
        assert snapshot(run_dir) == before
    finally:
        first.kill()  # kill -9: the lock file stays behind with the dead holder's record
        first.wait()
    stopped_at = max(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("*.pt"))
    resumed = run("train.py", train_args(run_dir, shards, "--resume", "auto",
                                         steps=stopped_at + 2), check=False)
    assert_fault(resumed, "stale_lock")
    assert f"PID {first.pid}" in resumed.stdout
    assert f"at step {stopped_at}" in resumed.stdout
    steps = metric_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == stopped_at + 2


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("key, override", [("lr_inf", "optim.lr=.inf"),
                                           ("inner_lr_zero", "algorithm.inner_lr=0")])
def test_non_finite_and_non_positive_rates_are_refused(key, override, shards, tmp_path):
    result = train(tmp_path / "run", shards, override)
    assert_fault(result, key)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_another_test_way_for_a_model_with_a_head_is_refused(shards, tmp_path):
    result = train(tmp_path / "run", shards, "eval.n_way=3")
    assert_fault(result, "eval_way_with_head")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_run_whose_steps_stay_non_finite_stops(shards, tmp_path):
    run_dir = tmp_path / "run"
    result = train(run_dir, shards, "algorithm.inner_lr=1e30", "train.max_skipped_steps=3",
                   steps=50)
    assert_fault(result, "nonfinite_steps")
    assert "3 of 3 steps were skipped" in result.stdout
    assert not (run_dir / "model.safetensors").exists()
    assert (run_dir / "checkpoints" / "step-00000003.pt").is_file()
    assert metric_steps(run_dir) == [1, 2, 3]


def test_a_loss_far_above_chance_is_warned_about_once(shards, tmp_path):
    result = train(tmp_path / "run", shards, "algorithm.inner_lr=1e6", steps=8)
    assert_fault(result, "loss_climb")
    assert result.stdout.count("the run may be diverging") == 1


# ---------------------------------------------------------------- data and checkpoints


def test_a_flipped_byte_in_a_test_shard_stops_the_run_before_training(packed, tmp_path):
    damaged = tmp_path / "shards"
    shutil.copytree(packed("futurama"), damaged)
    shard = sorted(damaged.glob("test-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    result = train(run_dir, damaged, steps=2)
    assert_fault(result, "test_shard_flipped")
    assert shard.name in result.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_resume_auto_skips_a_truncated_newest_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, shards, steps=4).returncode == 0
    newest = run_dir / "checkpoints" / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    result = train(run_dir, shards, "--resume", "auto", steps=6)
    assert_fault(result, "truncated_checkpoint")
    assert f"skipped {newest}" in result.stdout and "at step 2" in result.stdout
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_damaged_checkpoint_file_is_one_line(shards, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, shards).returncode == 0
    damaged = run_dir / "checkpoints" / "step-00000004.pt"
    damaged.write_bytes(b"not a checkpoint")
    before = snapshot(run_dir)
    assert_fault(train(run_dir, shards, "--resume", str(damaged)), "bad_resume_path")
    assert snapshot(run_dir) == before

    evaluation = run("evaluate.py", ["--run-dir", str(run_dir), "--checkpoint", str(damaged)],
                     check=False)
    assert_fault(evaluation, "evaluate_bad_checkpoint")
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- a stopped run


def test_a_stopped_run_says_how_far_it_got_in_its_model_and_its_evaluation(shards, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, shards, steps=400)
    trainer = subprocess.Popen(command("train.py", args, 0), cwd=ROOT, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "checkpoints" / "step-00000002.pt").is_file(), what="step 2")
    trainer.send_signal(signal.SIGTERM)
    stdout, stderr = trainer.communicate(timeout=120)
    assert_fault(subprocess.CompletedProcess(args, trainer.returncode, stdout, stderr),
                 "signal_stop")
    model = yaml.safe_load((run_dir / "model.yaml").read_text())
    assert model["planned_steps"] == 400 and 2 <= model["step"] < 400
    assert f"at step {model['step']} of 400" in stdout

    evaluation = run("evaluate.py", ["--run-dir", str(run_dir), "--episodes", "10"], check=False)
    assert_fault(evaluation, "evaluate_stopped")
    assert f"model of step {model['step']} of 400" in evaluation.stderr
    saved = json.loads((run_dir / "eval-test.json").read_text())
    assert (saved["trained_steps"], saved["planned_steps"]) == (model["step"], 400)


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_while_checkpointing_is_one_line_and_loses_nothing(shards, tmp_path):
    disk = tmp_path / "disk"
    probe = tmp_path / "probe"
    assert train(probe, shards, steps=2).returncode == 0
    checkpoint = (probe / "checkpoints" / "step-00000002.pt").stat().st_size
    small = sum((probe / name).stat().st_size for name in ("config.yaml", "run.json",
                                                           "metrics.jsonl"))
    # Room for the run's small files and one checkpoint, not for a second one beside it.
    mount_tmpfs(disk, (small + int(checkpoint * 1.5)) // 1024 + 8)
    try:
        run_dir = disk / "run"
        result = train(run_dir, shards, "train.keep_checkpoints=2", steps=4)
        assert_fault(result, "disk_full")
        assert str(run_dir / "checkpoints" / "step-00000004.pt") in result.stderr
        assert "KiB free of" in result.stderr
        kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert kept == ["step-00000002.pt"]  # no half-written file beside it
        assert metric_steps(run_dir) == [1, 2, 3, 4]

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = train(run_dir, shards, "--resume", "auto", steps=4)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "at step 2" in resumed.stdout
        assert metric_steps(run_dir) == [1, 2, 3, 4]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
