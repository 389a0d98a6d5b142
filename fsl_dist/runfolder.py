"""Ownership of a run folder: one trainer at a time, and never a new run on top of an old one.

A trainer holds an exclusive ``flock`` on ``<run folder>/.lock`` for its whole life. The kernel
drops the lock when the process ends in any way (exit, exception, kill -9), so a lock file left
by a dead process is stale by construction: the next trainer takes it over. The file records
the holder's PID, host and start time for the message a second trainer gets.

A folder that already holds a run (metrics, checkpoints, a model) is refused unless the new
trainer resumes it (``--resume``) or is told to move the old run aside (``--overwrite``).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

from fsl_dist.io import make_folder, writing

LOCK_NAME = ".lock"
# What makes a folder "hold a run": anything a trainer writes once it has started.
RUN_FILES = ("metrics.jsonl", "checkpoints", "model.safetensors", "eval.json", "run.json")
# What makes a run "finished" (or at least exported): it is never started over by --resume.
RESULT_FILES = ("model.safetensors", "eval.json")


class RunFolderError(Exception):
    """The run folder cannot be used as asked (held by another trainer, holds another run, is
    not a folder); the message says what to do."""


class RunLock:
    """An exclusive lock on a run folder, held until ``release()`` or the process's end."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None
        self.took_over: Optional[dict] = None  # the record of a dead holder, if one was left

    def acquire(self) -> "RunLock":
        ensure_folder(self.run_dir)
        with writing(self.path):  # the first write into the run folder: why it cannot be
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise RunFolderError(f"run folder {self.run_dir} is in use by {describe(holder)}; "
                                 "wait for that run to end, or give this one another --run-dir")
        previous = _read_record(fd)
        self.took_over = previous or None
        record = {"pid": os.getpid(), "host": platform.node(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:  # an empty record: released, not left by a dead holder
                os.ftruncate(self._fd, 0)
            except OSError:  # a disk gone read-only: the record stays, and reads as stale
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def holder(run_dir: Path) -> Optional[dict]:
    """The record of the trainer that holds ``run_dir`` now ({} if it left none), or None when
    no trainer does. Probes with a shared lock, dropped at once: a trainer starting within those
    microseconds would be refused as if the folder were in use."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_record(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_record(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(since {holder.get('started', '?')})")


def ensure_folder(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file, not a folder; give --run-dir a "
                             "folder path (it is made if missing)")
    try:
        make_folder(run_dir)
    except OSError as err:
        raise RunFolderError(f"cannot make run folder {run_dir}: {err.strerror}") from None


def held_run(run_dir: Path) -> list[str]:
    """The files of a run already in ``run_dir`` (empty: nothing a trainer wrote)."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def move_aside(run_dir: Path) -> Path:
    """Move everything of the old run (not the lock) into a sibling folder
    ``<name>.old-<time>``; returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    with writing(aside):  # the folder beside the run's may not be writable
        aside.mkdir()
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            entry.rename(aside / entry.name)
    return aside


def claim(run_dir: Path, *, resume: Optional[str], overwrite: bool) -> tuple[RunLock, str]:
    """Lock ``run_dir`` for this trainer and check that it may start there: a folder holding a
    run needs ``resume`` or ``overwrite`` (which moves the old run aside). Returns the lock and
    a line for the log."""
    run_dir = Path(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        note = f"run folder: {run_dir}"
        if lock.took_over:
            note += f" (took over the lock left by {describe(lock.took_over)}, no longer running)"
        existing = held_run(run_dir)
        if existing and overwrite:
            note += f"; the old run was moved to {move_aside(run_dir)}"
        elif existing and resume == "auto" and not _has_checkpoint(run_dir):
            note += "\n" + _start_over(run_dir)
        elif existing and resume is None:
            raise RunFolderError(
                f"run folder {run_dir} already holds a run ({', '.join(existing)}); continue it "
                "with --resume auto, start a new one with another --run-dir, or move the old "
                "one aside with --overwrite")
    except BaseException:
        lock.release()
        raise
    return lock, note


def _has_checkpoint(run_dir: Path) -> bool:
    # Damaged checkpoints count: --resume auto then refuses, naming them (trainer).
    # (checkpoint.CHECKPOINT_DIR: not imported, so that exits.py stays free of torch)
    return any(Path(run_dir, "checkpoints").glob("step-*.pt"))


def _start_over(run_dir: Path) -> str:
    """``--resume auto`` on a run without checkpoints: a finished run is refused (only
    --overwrite replaces it); an attempt that stopped before its first checkpoint is moved
    aside whole and the run starts over (a requeued job continues by itself, and the old rows
    do not mix with the new). Returns the line that says so."""
    results = [name for name in RESULT_FILES if (run_dir / name).exists()]
    if results:
        raise RunFolderError(
            f"--resume auto: run folder {run_dir} holds a finished run ({', '.join(results)}) "
            "but no checkpoint to continue from; start it afresh with --overwrite (the old run "
            "is moved aside) or give another --run-dir")
    aside = move_aside(run_dir)
    return (f"resume: {run_dir} holds no checkpoint (the earlier attempt stopped before its "
            f"first one): starting over; its files were moved to {aside}")
