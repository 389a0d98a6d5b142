"""Checkpoints that make a run resumable exactly.

A checkpoint holds the model, the learned inner step sizes (if any), the optimizer, both loss
scalers, the step, the random states and the data position. Tasks in memory mode are a pure
function of (seed, step, index), so the step *is* the data position. Files are written to a
temporary name and renamed into place; only the newest `keep` are kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from fsl_dist.io import atomic_write

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def step_of(path: Path) -> Optional[int]:
    """The step of a checkpoint file by its name, or None for any other file."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are never listed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`, then drop all but the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, damaged, not a checkpoint)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} cannot be read ({reason}); resume from an older one "
                         f"in {path.parent} (--resume auto takes the newest that loads)")
        self.path, self.reason = path, reason


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint (tensors and plain values only: no pickled code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; use --resume auto to take "
                                "the newest")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, and what to do
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(path, reason) from None


def newest_loadable(run_dir: Path) -> tuple[Optional[Path], Optional[dict], list[str]]:
    """The newest checkpoint of ``run_dir`` that loads, its contents, and a line for each newer
    one skipped (why); (None, None, notes) when none loads or there is none."""
    notes = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path), notes
        except CheckpointError as err:
            notes.append(f"skipped {path}: it cannot be read ({err.reason})")
    return None, None, notes


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
