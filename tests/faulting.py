"""Helpers of the fault tests (test_run_faults.py, test_write_faults.py): a tiny training run,
snapshots of folders, the one-line check of a fault, and the real mounts and the unprivileged
processes that make disks full, read-only or not writable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faults import BY_KEY

from launching import ROOT, child_env, command, run

TINY = ["task.k_shot=1", "task.q_query=2", "train.meta_batch_size=2", "model.width=8",
        "train.log_every=1", "eval.episodes=10", "eval.val_episodes=4", "eval.batch_size=10",
        "eval.inner_steps=1", "logging.wandb=false"]

# Root ignores permission bits (CAP_DAC_OVERRIDE): the commands that must meet them run as root
# without that capability, so they can still read what root's tests wrote (owner bits apply).
UNPRIVILEGED = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


def train_args(run_dir: Path, shards: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--run-dir", str(run_dir),
            f"data.shards={shards}", *TINY, f"train.steps={steps}", "train.checkpoint_every=2",
            f"train.eval_every={steps}", *extra]


def train(run_dir: Path, shards: Path, *extra: str, steps: int = 4) -> subprocess.CompletedProcess:
    return run("train.py", train_args(run_dir, shards, *extra, steps=steps), check=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the lock) by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def assert_fault(result: subprocess.CompletedProcess, key: str) -> None:
    """The exit code and line of fault ``key``, and no traceback."""
    fault = BY_KEY[key]
    output = result.stdout + result.stderr
    assert result.returncode == fault.code, output[-3000:]
    assert fault.seen in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    if fault.code not in (0, 75):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and fault.seen in errors[0], result.stderr[-3000:]


def _privileged(what: str, done: subprocess.CompletedProcess) -> None:
    """Fail or skip when a mount (root's) could not be made."""
    if done.returncode:
        if os.environ.get("FSL_REQUIRE_SLURM") == "1":  # CI runs as root: it must run here
            pytest.fail(f"cannot {what}: {done.stderr.strip()}")
        pytest.skip(f"{what} needs root: {done.stderr.strip()}")


def mount_tmpfs(folder: Path, size_kib: int, *, read_only: bool = False) -> None:
    """A tmpfs of ``size_kib`` at ``folder`` (made here); unmount with ``unmount``."""
    folder.mkdir()
    options = f"size={size_kib}k" + (",ro" if read_only else "")
    _privileged("mount a tmpfs", subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True, text=True))


def bind_read_only(source: Path, target: Path) -> None:
    """``source`` seen read-only at ``target`` (made here)."""
    target.mkdir()
    _privileged("bind-mount a folder", subprocess.run(
        ["mount", "--bind", str(source), str(target)], capture_output=True, text=True))
    subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], check=True)


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def unprivileged() -> list[str]:
    """The command prefix that runs a process without CAP_DAC_OVERRIDE (skip without root)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
    probe = subprocess.run([*UNPRIVILEGED, "true"], capture_output=True, text=True)
    _privileged("drop CAP_DAC_OVERRIDE with setpriv", probe)
    return UNPRIVILEGED


def metric_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def interrupt_launcher(args: list[str], ready, what: str, after: float = 0.0):
    """Start `accelerate launch` (one process) on train.py with ``args``, wait until ``ready()``
    (and ``after`` seconds more), send the launcher SIGINT as Ctrl-C would, and collect it:
    (the finished process, its stdout, its stderr). The launcher is killed if it outlives this."""
    # As from a terminal: Ctrl-C not ignored, even when these tests run as a background job of
    # a script (which ignores SIGINT, and its children inherit that).
    launcher = subprocess.Popen(command("train.py", args, 1), cwd=ROOT, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(ready, what=what)
        time.sleep(after)
        launcher.send_signal(signal.SIGINT)
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return launcher, stdout, stderr
