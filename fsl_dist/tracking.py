"""Where metrics go: a local `metrics.jsonl` in the run folder, and W&B through accelerate's
trackers (main process only). W&B never prompts and never needs the network: without an API key
it runs offline, and `logging.wandb=false` turns it off. TensorBoard (`logging.tensorboard=true`)
is accelerate's tracker too, set up in fsl_dist/distributed.py (RunTensorBoard)."""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Optional

from fsl_dist.io import append_line, atomic_write_text

METRICS_FILE = "metrics.jsonl"


def wandb_mode() -> str:
    """online when an API key is configured, else offline; WANDB_MODE set by the user wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        hosts = {}
    return "online" if any("wandb" in host for host in hosts) else "offline"


def wandb_init_kwargs(cfg, run_dir: Path, run_id: Optional[str]) -> dict:
    """Name, group and tags that let the runs of a sweep sit side by side in W&B."""
    mode = wandb_mode()
    os.environ["WANDB_MODE"] = mode  # wandb reads it at init; offline must never prompt
    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs = {
        "name": run_dir.name,
        "group": cfg.logging.group or cfg.name,
        "tags": list(cfg.logging.tags) + [cfg.model.name, cfg.algorithm.name, cfg.data.split,
                                         f"{cfg.task.n_way}w{cfg.task.k_shot}s"],
        "dir": str(run_dir),
        "mode": mode,
        "resume": "allow",
    }
    if cfg.logging.entity:
        kwargs["entity"] = cfg.logging.entity
    if run_id:
        kwargs["id"] = run_id  # a resumed run continues the same W&B run
    return kwargs


class MetricsFile:
    """Appends one JSON object per line; on resume, rows after the resumed step are dropped so
    the file reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            append_line(self.path, json.dumps(row, sort_keys=True))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
