"""Run-folder ownership, the checkpoint fallback, the divergence watch and the rate checks, in
process (the same behaviours through real trainer processes: test_run_faults.py)."""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os

import pytest
import torch

from fsl_dist import checkpoint as ckpt
from fsl_dist.config import ConfigError, load_config
from fsl_dist.io import DiskFullError, append_line, atomic_write
from fsl_dist.runfolder import RunFolderError, RunLock, claim, held_run
from fsl_dist.trainer import LossWatch

from launching import ROOT


def test_a_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunFolderError, match=f"in use by PID {os.getpid()} on host"):
        RunLock(tmp_path / "run").acquire()  # another open file description: flock conflicts
    first.release()
    RunLock(tmp_path / "run").acquire().release()


def _hold_and_die(folder):
    RunLock(folder).acquire()
    os._exit(0)  # no release: the record stays, the kernel drops the flock


def test_a_lock_left_by_a_dead_process_is_taken_over_and_said_so(tmp_path):
    folder = tmp_path / "run"
    child = multiprocessing.get_context("fork").Process(target=_hold_and_die, args=(folder,))
    child.start()
    child.join()
    lock = RunLock(folder).acquire()
    assert lock.took_over["pid"] == child.pid
    lock.release()
    assert RunLock(folder).acquire().took_over is None  # a released lock leaves no record


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "step-00000001.pt").write_bytes(b"")
    assert held_run(folder) == ["metrics.jsonl", "checkpoints"]
    with pytest.raises(RunFolderError, match="already holds a run .metrics.jsonl, checkpoints.; "
                       "continue it with --resume auto"):
        claim(folder, resume=None, overwrite=False)
    lock, _ = claim(folder, resume="auto", overwrite=False)
    lock.release()
    lock, note = claim(folder, resume=None, overwrite=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert f"moved to {aside}" in note
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert held_run(folder) == [] and (folder / ".lock").exists()
    lock.release()


def test_resume_auto_without_a_checkpoint_refuses_a_finished_run_and_moves_an_attempt_aside(
        tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "eval.json").write_text("{}")
    with pytest.raises(RunFolderError, match="holds a finished run .eval.json. but no checkpoint"):
        claim(folder, resume="auto", overwrite=False)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "eval.json", "metrics.jsonl"]

    (folder / "eval.json").unlink()  # an attempt that died before its first checkpoint
    lock, note = claim(folder, resume="auto", overwrite=False)
    (aside,) = tmp_path.glob("run.old-*")
    assert note.splitlines()[1].endswith(f"starting over; its files were moved to {aside}")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert held_run(folder) == []
    lock.release()


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunLock(tmp_path / "f").acquire()


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.ones(3)}, keep=5)
    ckpt.checkpoint_path(tmp_path, 6).write_bytes(b"garbage")
    newest = ckpt.checkpoint_path(tmp_path, 4)
    newest.write_bytes(newest.read_bytes()[:50])
    path, saved, notes = ckpt.newest_loadable(tmp_path)
    assert path == ckpt.checkpoint_path(tmp_path, 2) and saved["step"] == 2
    assert [n.split(":")[0] for n in notes] == [
        f"skipped {ckpt.checkpoint_path(tmp_path, s)}" for s in (6, 4)]
    assert all("cannot be read" in n for n in notes)


def test_a_write_that_runs_out_of_space_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def full(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFullError, match=f"no space left on the device writing {target} "
                       r"\(.* free of .* there\)"):
        atomic_write(target, full)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_an_appended_line_is_whole_or_absent(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"step": 1}))
    append_line(path, json.dumps({"step": 2}))
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_the_loss_watch_warns_once_per_climb_and_when_far_above_chance():
    watch = LossWatch(factor=3.0, chance=math.log(5))
    warnings = [watch.update(loss, step) for step, loss in enumerate(
        [1.0] * 5 + [0.5] * 30 + [50.0] * 10 + [0.5] * 60 + [50.0] * 10, start=1)]
    fired = [step for step, w in enumerate(warnings, start=1) if w]
    assert len(fired) == 2 and 35 < fired[0] < 45 and fired[1] > 105
    assert "over 3x its lowest so far" in warnings[fired[0] - 1]
    blown = LossWatch(factor=10.0, chance=math.log(5))
    first = blown.update(5.6e10, 1)
    assert "over 10x that of guessing (1.609)" in first
    assert [blown.update(6e10, s) for s in range(2, 20)] == [None] * 18  # once per excursion
    assert all(LossWatch(None, 1.0).update(x, 1) is None for x in (1.0, 1e9))
    assert LossWatch(3.0, 1.0).update(float("nan"), 1) is None


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.inf", "`optim.lr` = inf must be a finite number"),
    ("optim.lr=.nan", "`optim.lr` = nan must be a finite number"),
    ("algorithm.inner_lr=-0.1", "`algorithm.inner_lr` = -0.1 must be positive"),
    ("algorithm.inner_lr={features: 0.1, classifier: .inf}",
     "`algorithm.inner_lr.classifier` = inf must be a finite number"),
    ("optim.min_lr=.nan", "`optim.min_lr` = nan must be a finite number"),
    ("optim.grad_clip=.inf", "`optim.grad_clip` = inf must be a finite number"),
    ("train.max_skipped_steps=0", "`train.max_skipped_steps` must be at least 1 or null"),
    ("train.loss_warn_factor=1", "`train.loss_warn_factor` = 1.0 must be above 1 or null"),
])
def test_rates_must_be_finite_and_positive(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "cnn_maml.yaml", [override])
    assert message in str(err.value)
