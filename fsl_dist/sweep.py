"""Sweeps: a grid of configs x seeds (x override values) that runs as one SLURM array job.

A sweep file (`configs/sweeps/*.yaml` shipped, or one of your own; the shipped ones are found
by name too: `fsl-sweep list cnn_shots`):

    name: cnn_compare                 # optional, default the file's stem: W&B group and folder name
    configs: [../cnn_maml.yaml, ../cnn_boil.yaml]   # relative to this file, like `inherit:`
    seeds: [0, 1, 2]                  # or a count: `seeds: 3` means 0, 1, 2
    overrides:                        # dotted config keys, applied to every run
      train.steps: 1000
    grid:                             # optional: every combination of these values,
                                      # for every config
      task.k_shot: [1, 5]
    runs_dir: runs                    # run folders:
                                      # <runs_dir>/<name>/<config>[-<key>=<value>...]-s<seed>
    cpu_processes: 1                  # training processes per array task when it has no GPU

Runs are numbered config first, then grid combination, then seed (the seed varies fastest), so
array task `i` always trains `sweep.runs()[i]`. Each run gets `train.seed`, `logging.group` (the
sweep's name) and its run folder from the sweep; the sweep therefore refuses to set those keys
itself. Overrides become `key=value` strings in an argv list (never a shell command line).

    sweep = load_sweep("configs/sweeps/cnn_compare.yaml")
    run = sweep.run(3)                          # config, seed, overrides of array task 3
    argv = sweep.train_args(run)                # arguments for launch/train.py
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from fsl_dist.config import ConfigError, load_config, shipped_configs

KEYS = ("name", "configs", "seeds", "overrides", "grid", "runs_dir", "cpu_processes")
# Keys each run receives from the sweep; setting them in `overrides`/`grid` would be silently lost.
RESERVED = {"train.seed": "list the seeds under `seeds:`",
            "logging.group": "the W&B group is the sweep's `name`",
            "name": "run folders and W&B groups are named after the config and the sweep"}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


class SweepError(ValueError):
    """A sweep file that cannot be used as given; the message names the file and the key."""


@dataclass(frozen=True)
class SweepRun:
    """One array task: which config, seed and overrides it trains, and what it is called."""

    index: int
    config: Path
    config_name: str
    seed: int
    grid: tuple[tuple[str, Any], ...]
    """This run's values of the sweep's `grid` keys (also part of `overrides`)."""
    overrides: tuple[str, ...]
    """`key=value` overrides from the sweep file (the sweep's own, then the grid's)."""
    name: str
    """Run folder name, which is also the W&B run name."""


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    configs: tuple[Path, ...]
    seeds: tuple[int, ...]
    overrides: tuple[tuple[str, Any], ...]
    grid: tuple[tuple[str, tuple], ...]
    runs_dir: Path
    cpu_processes: int = 1

    def __len__(self) -> int:
        return len(self.configs) * len(self.seeds) * _product_size(self.grid)

    def runs(self) -> list[SweepRun]:
        """Every run, in array-index order."""
        runs = []
        grid_keys = [k for k, _ in self.grid]
        combos = list(itertools.product(*(values for _, values in self.grid)))
        leaves = _short_keys(grid_keys)
        for config in self.configs:
            config_name = _config_name(config, self.path)
            for combo in combos:
                grid = tuple(zip(grid_keys, combo))
                overrides = tuple(override_text(k, v) for k, v in self.overrides + grid)
                suffix = "".join(f"-{leaves[k]}={_safe(format_value(v))}" for k, v in grid)
                for seed in self.seeds:
                    runs.append(SweepRun(len(runs), config, config_name, seed, grid, overrides,
                                         f"{config_name}{suffix}-s{seed}"))
        names = [r.name for r in runs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SweepError(f"{self.path}: two runs would share the folder name {twice[0]!r}; "
                             "make the configs' names or the grid values distinct")
        return runs

    def run(self, index: int) -> SweepRun:
        runs = self.runs()
        if not 0 <= index < len(runs):
            raise SweepError(f"{self.path}: array index {index} is out of range; this sweep has "
                             f"{len(runs)} runs (indices 0-{len(runs) - 1})")
        return runs[index]

    def group_dir(self, runs_dir: Optional[Path] = None) -> Path:
        """Folder holding the sweep's run folders (and compare.py's PNG)."""
        return Path(runs_dir or self.runs_dir) / self.name

    def run_dir(self, run: SweepRun, runs_dir: Optional[Path] = None) -> Path:
        return self.group_dir(runs_dir) / run.name

    def train_args(self, run: SweepRun, runs_dir: Optional[Path] = None) -> list[str]:
        """Arguments of launch/train.py for `run`: always `--resume auto`, so a requeued task
        continues from its newest checkpoint and a fresh one simply starts."""
        return ["--config", str(run.config), "--run-dir", str(self.run_dir(run, runs_dir)),
                "--resume", "auto", *self.config_overrides(run)]

    def config_overrides(self, run: SweepRun) -> list[str]:
        """All overrides of `run`: the sweep's, the grid's, then its seed and W&B group."""
        return [*run.overrides, f"train.seed={run.seed}", f"logging.group={self.name}"]

    def array_spec(self) -> str:
        """The `--array` value that runs the whole sweep."""
        return f"0-{len(self) - 1}"

    def check(self) -> None:
        """Resolve every run's full config (file + overrides + seed), so a bad override fails at
        submission instead of inside an array task."""
        for run in self.runs():
            try:
                load_config(run.config, self.config_overrides(run))
            except ConfigError as err:
                raise SweepError(f"{self.path}: run {run.index} ({run.name}): {err}") from None


# ---------------------------------------------------------------- reading a sweep file


def shipped_sweeps() -> list[str]:
    """Names of the sweeps shipped with fsl_dist (configs/sweeps/ of the wheel or checkout)."""
    tree = shipped_configs()
    folder = tree / "sweeps" if tree is not None else None
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder and folder.is_dir() else []


def find_sweep(given: str | Path) -> Path:
    """A sweep file that exists, or else a shipped sweep by name (`cnn_shots`, with or without
    `.yaml`, `sweeps/` or `configs/sweeps/`), so the README's sweep commands work from a wheel."""
    path = Path(given)
    if path.is_file():
        return path
    tree = shipped_configs()
    if tree is not None and not path.is_absolute() and path.parent.as_posix() in (
            ".", "sweeps", "configs/sweeps"):
        shipped = tree / "sweeps" / (path.stem + ".yaml")
        if shipped.is_file():
            return shipped
    names = ", ".join(shipped_sweeps()) or "none"
    raise SweepError(f"sweep file {given} does not exist, and no sweep of that name ships with "
                     f"fsl_dist (shipped: {names}; their files show the format)")


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every error names the file and the key."""
    path = find_sweep(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path} must hold a mapping with at least `configs` and `seeds`")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key `{unknown[0]}`; a sweep file has: {', '.join(KEYS)}")

    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise SweepError(f"{path}: `name` = {name!r} must be letters, digits, '_', '.' or '-' "
                         "(it names a folder and the W&B group)")
    return Sweep(
        path=path,
        name=name,
        configs=_configs(raw, path),
        seeds=_seeds(raw, path),
        overrides=_overrides(raw, path),
        grid=_grid(raw, path),
        runs_dir=Path(_string(raw, "runs_dir", path, "runs")),
        cpu_processes=_positive_int(raw, "cpu_processes", path, 1),
    )


def _configs(raw: dict, path: Path) -> tuple[Path, ...]:
    configs = raw.get("configs")
    if isinstance(configs, str):
        configs = [configs]
    if not isinstance(configs, list) or not configs or not all(isinstance(c, str) for c in configs):
        raise SweepError(f"{path}: `configs` must be a non-empty list of config files "
                         "(paths relative to the sweep file, e.g. ../cnn_maml.yaml)")
    resolved = []
    for entry in configs:
        config = (path.parent / entry).resolve()
        if not config.is_file():
            raise SweepError(f"{path}: `configs` entry {entry!r} does not exist (looked for "
                             f"{config}; paths are relative to the sweep file)")
        resolved.append(config)
    if len(set(resolved)) != len(resolved):
        raise SweepError(f"{path}: `configs` lists the same file twice")
    return tuple(resolved)


def _seeds(raw: dict, path: Path) -> tuple[int, ...]:
    seeds = raw.get("seeds")
    if _is_int(seeds) and seeds > 0:
        return tuple(range(seeds))
    if (not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds)):
        raise SweepError(f"{path}: `seeds` must be a list of non-negative integers, or a count "
                         f"(`seeds: 3` means 0, 1, 2); got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: `seeds` lists a seed twice: {seeds}")
    return tuple(seeds)


def _overrides(raw: dict, path: Path) -> tuple[tuple[str, Any], ...]:
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{path}: `overrides` must map dotted config keys to values "
                         "(e.g. `train.steps: 1000`)")
    for key in overrides:
        _check_key(key, path, "overrides")
    return tuple(overrides.items())


def _grid(raw: dict, path: Path) -> tuple[tuple[str, tuple], ...]:
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: `grid` must map dotted config keys to lists of values")
    shared = sorted(set(grid) & {k for k, _ in _overrides(raw, path)})
    if shared:
        raise SweepError(f"{path}: `{shared[0]}` is in both `overrides` and `grid`; keep it in one")
    out = []
    for key, values in grid.items():
        _check_key(key, path, "grid")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: `grid.{key}` must be a non-empty list of values")
        out.append((key, tuple(values)))
    return tuple(out)


def _check_key(key, path: Path, section: str) -> None:
    if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", key):
        raise SweepError(f"{path}: `{section}` key {key!r} must be a dotted config key like "
                         "train.steps")
    if key in RESERVED:
        raise SweepError(f"{path}: `{section}.{key}` cannot be set in a sweep: {RESERVED[key]}")


def _string(raw: dict, key: str, path: Path, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value:
        raise SweepError(f"{path}: `{key}` must be a folder path, got {value!r}")
    return value


def _positive_int(raw: dict, key: str, path: Path, default: int) -> int:
    value = raw.get(key, default)
    if not _is_int(value) or value < 1:
        raise SweepError(f"{path}: `{key}` must be a positive integer, got {value!r}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- values and names


def format_value(value) -> str:
    """A sweep value as the text of a `key=value` override that load_config parses back to the
    same value: plain strings stay as written, everything else is JSON (which YAML reads)."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return json.dumps(value)


def override_text(key: str, value) -> str:
    return f"{key}={format_value(value)}"


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "_"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each grid key's last part (`task.k_shot` -> `k_shot`), or the whole key where two
    share it."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def _product_size(grid) -> int:
    size = 1
    for _, values in grid:
        size *= len(values)
    return size


def _config_name(config: Path, sweep_path: Path) -> str:
    try:
        return load_config(config).name
    except ConfigError as err:
        raise SweepError(f"{sweep_path}: config {config}: {err}") from None


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def describe(sweep: Sweep, runs_dir: Optional[Path] = None) -> str:
    """The index -> run folder, config, seed, overrides table that `sweep.py list` prints."""
    runs = sweep.runs()
    rows = [("index", "run folder", "config", "seed", "overrides")]
    for run in runs:
        rows.append((str(run.index), str(sweep.run_dir(run, runs_dir)), _shown(run.config),
                     str(run.seed), " ".join(run.overrides) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
             for row in rows]
    lines.append(f"{len(runs)} runs (sbatch --array={sweep.array_spec()}); "
                 f"W&B group {sweep.name!r}")
    return "\n".join(lines)
