"""Write failures as a user meets them, through real processes: a folder this user may not write
(a process without CAP_DAC_OVERRIDE), a read-only mount, a full tmpfs, a file where a folder
should be. Each ends in one line and its own exit code, with every file that was there before
byte for byte the same (the list: tests/faults.py, shown in docs/faults.md)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from faulting import (
    assert_fault,
    bind_read_only,
    mount_tmpfs,
    snapshot,
    train_args,
    unmount,
    unprivileged,
)
from PIL import Image

from launching import ROOT, child_env, command, run
from predicting import episodes, write_episode

NEVER_FINISHES = ["--episodes", "1000000"]  # an evaluation that ran would time the test out


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """One tiny finished run for the evaluate, predict and compare cases (none may change it)."""
    run_dir = tmp_path_factory.mktemp("written") / "run"
    run("train.py", train_args(run_dir, shards, steps=2))
    return run_dir


@pytest.fixture(scope="module")
def episode(shards, tmp_path_factory) -> tuple[Path, Path]:
    tasks = episodes(shards, 5, 1, 2, seed=3, count=1)
    return write_episode(tmp_path_factory.mktemp("episode"), tasks, 0, inverted=True)


def launch(script: str, args: list[str], *, prefix=(), processes: int = 0,
           quiet_launcher: bool = False) -> subprocess.CompletedProcess:
    argv = command(script, args, processes)
    if quiet_launcher:
        argv.insert(3, "--quiet")  # after `python -m accelerate.commands.launch`
    return subprocess.run([*prefix, *argv], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=180)


def predict(args: list[str], *, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "fsl_dist.cli.predict", *args],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=180)


class not_writable:
    """The folder without write permission (for its owner too) inside the block."""

    def __init__(self, folder: Path):
        self.folder, self.mode = folder, folder.stat().st_mode

    def __enter__(self):
        self.folder.chmod(0o555)

    def __exit__(self, *exc):
        self.folder.chmod(self.mode)


# ---------------------------------------------------------------- evaluate


def test_evaluating_into_a_folder_this_user_may_not_write_fails_before_the_evaluation(trained):
    before = snapshot(trained)
    with not_writable(trained):
        result = launch("evaluate.py", ["--run-dir", str(trained), *NEVER_FINISHES],
                        prefix=unprivileged())
    assert_fault(result, "evaluate_denied")
    assert f"writing {trained / 'eval-test.json'}" in result.stderr
    assert snapshot(trained) == before


def test_evaluating_on_a_read_only_mount_fails_before_the_evaluation(trained, tmp_path):
    before = snapshot(trained)
    seen = tmp_path / "ro"
    bind_read_only(trained, seen)
    try:
        result = launch("evaluate.py", ["--run-dir", str(seen), *NEVER_FINISHES])
    finally:
        unmount(seen)
    assert_fault(result, "evaluate_read_only")
    assert snapshot(trained) == before


# ---------------------------------------------------------------- train


def test_training_in_a_folder_this_user_may_not_write_is_one_line(shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine\n")
    with not_writable(run_dir):
        result = launch("train.py", train_args(run_dir, shards, steps=2), prefix=unprivileged())
    assert_fault(result, "train_denied")
    assert f"writing {run_dir / '.lock'}" in result.stderr
    assert snapshot(run_dir) == {"notes.txt": b"mine\n"}


def test_training_on_a_small_read_only_disk_says_read_only_once(shards, tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, 64, read_only=True)  # 64 KiB free: once taken for a full disk
    try:
        alone = launch("train.py", train_args(disk / "run", shards, steps=2))
        # Two ranks: the main one says why; the launcher reports a failed child as exit 1 (with
        # a ChildFailedError traceback unless --quiet: README, "Stopping and resuming").
        ranks = launch("train.py", train_args(disk / "run", shards, steps=2), processes=2,
                       quiet_launcher=True)
        left = list(disk.iterdir())
    finally:
        unmount(disk)
    assert_fault(alone, "train_read_only")
    assert "no space" not in alone.stderr
    errors = [line for line in ranks.stderr.splitlines() if line.startswith("error:")]
    assert ranks.returncode != 0 and "Traceback" not in ranks.stderr, ranks.stderr[-3000:]
    assert errors == alone.stderr.splitlines()[-1:], ranks.stderr[-3000:]
    assert left == []


def test_a_run_folder_made_unwritable_while_training_keeps_what_was_written(shards, tmp_path):
    run_dir = tmp_path / "run"
    args = command("train.py", train_args(run_dir, shards, steps=400), 0)
    trainer = subprocess.Popen([*unprivileged(), *args], cwd=ROOT, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "step-00000002.pt").is_file():
            assert time.monotonic() < deadline and trainer.poll() is None, "no checkpoint"
            time.sleep(0.05)
        for path in (run_dir / "metrics.jsonl", run_dir / "checkpoints", run_dir):
            path.chmod(0o555 if path.is_dir() else 0o444)
        before = snapshot(run_dir)
        stdout, stderr = trainer.communicate(timeout=180)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert_fault(subprocess.CompletedProcess(args, trainer.returncode, stdout, stderr),
                 "train_denied_midway")
    assert "(training continues with --resume auto)" in stderr
    assert snapshot(run_dir) == before and "checkpoints/step-00000002.pt" in before


def test_a_run_dir_inside_a_file_is_a_wrong_path(shards, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    assert_fault(launch("train.py", train_args(notes / "run", shards, steps=2)),
                 "run_dir_in_a_file")
    assert notes.read_text() == "mine\n" and list(tmp_path.iterdir()) == [notes]


def test_a_file_where_the_tensorboard_folder_goes_is_one_line(shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("mine\n")
    result = launch("train.py", train_args(run_dir, shards, "logging.tensorboard=true", steps=2))
    assert_fault(result, "tensorboard_is_a_file")
    assert snapshot(run_dir) == {"tensorboard": b"mine\n"}


# ---------------------------------------------------------------- pack


def test_shards_the_trainer_packs_onto_a_read_only_disk_are_one_line(omniglot_source, tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, 1024, read_only=True)
    try:
        result = launch("train.py", train_args(tmp_path / "run", disk / "shards", steps=2)
                        + [f"data.source={omniglot_source}"])
        left = list(disk.iterdir())
    finally:
        unmount(disk)
    assert_fault(result, "train_packs_read_only")
    assert f"cannot write {disk / 'shards'}" in result.stderr and left == []


def image_folder(root: Path, classes: int = 10, images: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(images):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_packing_onto_a_full_disk_is_one_line_and_loses_nothing(tmp_path):
    source = image_folder(tmp_path / "images")
    disk = tmp_path / "disk"
    mount_tmpfs(disk, 24)  # the shards need about 45 KiB
    try:
        (disk / "thesis.txt").write_bytes(b"chapter one\n" * 100)
        before = snapshot(disk)
        result = launch("pack.py", ["folder", str(source), "--out", str(disk / "shards"),
                                    "--size", "28", "--channels", "1"])
        after, left = snapshot(disk), sorted(p.name for p in disk.iterdir())
    finally:
        unmount(disk)
    assert_fault(result, "pack_full")
    assert f"writing {disk / 'shards'}" in result.stderr
    assert after == before and left == ["thesis.txt"]  # no staging folder left behind


def test_packing_into_a_path_under_a_file_is_a_wrong_path(tmp_path):
    source = image_folder(tmp_path / "images", classes=5, images=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    result = launch("pack.py", ["folder", str(source), "--out", str(notes / "shards"),
                                "--size", "28", "--channels", "1"])
    assert_fault(result, "pack_in_a_file")
    assert notes.read_text() == "mine\n"


# ---------------------------------------------------------------- predict and compare


def test_predict_out_under_a_file_is_refused_before_the_work(trained, episode, tmp_path):
    support, query = episode
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    result = predict(["--model", str(trained), "--support", str(support), "--query", str(query),
                      "--out", str(notes / "labels.csv")])
    assert_fault(result, "predict_out_in_a_file")
    assert result.stdout == ""  # no table: refused before the predictions
    assert notes.read_text() == "mine\n"


def test_predict_out_in_a_folder_this_user_may_not_write_is_refused_before_the_work(
        trained, episode, tmp_path):
    support, query = episode
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "labels.csv").write_text("earlier\n")
    with not_writable(folder):
        result = predict(["--model", str(trained), "--support", str(support), "--query",
                          str(query), "--out", str(folder / "labels.csv")],
                         prefix=unprivileged())
    assert_fault(result, "predict_out_denied")
    assert result.stdout == ""
    assert snapshot(folder) == {"labels.csv": b"earlier\n"}


def test_compare_into_a_read_only_folder_is_one_line(trained, tmp_path):
    plots, seen = tmp_path / "plots", tmp_path / "ro"
    plots.mkdir()
    (plots / "old.png").write_bytes(b"an earlier plot")
    bind_read_only(plots, seen)
    try:
        result = launch("compare.py", [str(trained), "--plot", str(seen / "curves.png")])
    finally:
        unmount(seen)
    assert_fault(result, "compare_read_only")
    assert result.stdout == ""  # refused before the tables
    assert snapshot(plots) == {"old.png": b"an earlier plot"}
