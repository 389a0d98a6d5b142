"""Talking to the SLURM clusters of the SLURM tests: commands, job states, waiting for jobs, a
requeued job released at once, the tiny runs' overrides, and skipping (or failing, with
FSL_REQUIRE_SLURM=1) where no cluster can be had."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "PREEMPTED"}
# Tiny CPU runs: one thread, the per-task loop (fastest at this size), few episodes.
TINY = {"model.width": 8, "train.meta_batch_size": 2, "task.k_shot": 1, "task.q_query": 2,
        "eval.episodes": 10, "eval.val_episodes": 4, "eval.batch_size": 5, "train.cpu_threads": 1,
        "algorithm.vectorize": False, "train.log_every": 1}


def _unavailable(reason: str):
    if os.environ.get("FSL_REQUIRE_SLURM") == "1":
        pytest.fail(f"FSL_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def slurm_cmd(env: dict, *argv: str, check: bool = True) -> str:
    result = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return result.stdout


def job_states(env: dict, job: str) -> dict[str, str]:
    """{job id (or array task id): state} for every task of `job`, finished ones included."""
    out = slurm_cmd(env, "squeue", "-h", "-j", job, "-t", "all", "-o", "%i %T", check=False)
    return dict(line.split() for line in out.splitlines() if line.strip())


def wait_for(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(env: dict, job: str, tasks: int, timeout: float,
              logs: list[Path] = ()) -> dict[str, str]:
    def done():
        states = job_states(env, job)
        return states if len(states) == tasks and set(states.values()) <= TERMINAL else None
    try:
        return wait_for(done, timeout, f"job {job}")
    except AssertionError:
        raise AssertionError(f"job {job}: {job_states(env, job)}\n" + "\n".join(
            f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())) from None


def release_requeued(env: dict, job: str) -> None:
    """Start a requeued job now instead of after the ~120 s SLURM holds it (BeginTime). Not
    before the previous instance is gone and the clock has moved on: slurmd revokes the old
    instance's credential with one-second resolution, and a relaunch in that same second is
    killed ("Job credential revoked")."""
    def requeued():
        info = slurm_cmd(env, "scontrol", "show", "job", job, check=False)
        return "Restarts=1" in info and "JobState=PENDING" in info
    wait_for(requeued, 120, f"job {job} to requeue")
    wait_for(lambda: slurm_cmd(env, "sinfo", "-h", "-o", "%T").strip() == "idle", 60,
             "the node to be idle")
    time.sleep(2)
    slurm_cmd(env, "scontrol", "update", f"JobId={job}", "StartTime=now")


def overrides(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
