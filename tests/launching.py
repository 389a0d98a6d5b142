"""Run fsl_dist's entry points the way users do: `python launch/...` for one process and
`accelerate launch --multi_gpu --num_processes N` for several (gloo ranks on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fsl_dist.cpu_malloc import tcmalloc_path
from fsl_dist.slurm import free_port

ROOT = Path(__file__).resolve().parents[1]
# the trainer's tiny run of the end-to-end tests: two steps, few episodes
SMALL = ["task.k_shot=1", "task.q_query=2", "train.meta_batch_size=2", "train.steps=2",
         "train.checkpoint_every=1", "train.eval_every=2", "train.log_every=1",
         "eval.episodes=10", "eval.val_episodes=4", "eval.batch_size=10", "eval.inner_steps=2"]
WIDTH = {"cnn": "model.width=8", "resnet": "model.width=4"}


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


def config_args(name: str, run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / f"{name}.yaml"), "--run-dir", str(run_dir),
            f"data.shards={shards}", *SMALL, WIDTH[name.split("_")[0]], *extra]


def require_tcmalloc() -> str:
    """gperftools' tcmalloc (train.cpu_allocator=tcmalloc), or a skip; a failure instead with
    FSL_REQUIRE_TCMALLOC=1 (.ci/run installs it)."""
    import pytest
    path = tcmalloc_path()
    if path is None:
        why = "tcmalloc is not installed (apt install libtcmalloc-minimal4)"
        if os.environ.get("FSL_REQUIRE_TCMALLOC") == "1":
            pytest.fail(f"FSL_REQUIRE_TCMALLOC=1 but {why}")
        pytest.skip(why)
    return path
