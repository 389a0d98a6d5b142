"""Run fsl_dist's entry points the way users do: `python launch/...` for one process and
`accelerate launch --multi_gpu --num_processes N` for several (gloo ranks on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fsl_dist.slurm import free_port

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("WANDB_API_KEY", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def command(script: str, args: list[str], processes: int) -> list[str]:
    path = str(ROOT / "launch" / script)
    if processes == 0:  # plain python, no launcher
        return [sys.executable, path, *args]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "--num_processes", str(processes)]
    if processes > 1:
        launcher.insert(3, "--multi_gpu")
    return [*launcher, path, *args]


def run(script: str, args: list[str], *, processes: int = 0, timeout: float = 300,
        check: bool = True, env: dict | None = None,
        cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(command(script, args, processes), cwd=cwd, env=env or child_env(),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-4000:]}\n"
                             f"--- stderr\n{result.stderr[-6000:]}")
    return result
