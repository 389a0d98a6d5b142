"""Compare runs: one row per run, one row per config (mean +- std over its seeds), and a PNG of
the learning curves per config.

Runs come from run folders (config.yaml, metrics.jsonl, eval.json and the offline W&B files, no
network needed) or from the W&B API. Runs are grouped by their resolved config with the seed
(and the logging section) left out, so the grid points of a sweep (say k_shot=1 and k_shot=5 of
one config file) stay apart, and only the seeds of one setting are averaged.

    runs = [from_run_dir(d) for d in run_dirs]
    print(format_runs(runs)); print(format_groups(aggregate(runs)))
    plot_curves(aggregate(runs), "compare.png")
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import yaml

from fsl_dist.io import atomic_write, atomic_write_text
from fsl_dist.resume import describe, recorded_changes
from fsl_dist.tracking import read_metrics
from fsl_dist.wandb_offline import find_run_files, read_run

# Left out when deciding which runs are seeds of the same setting: the seed, and what changes
# bookkeeping, paths or speed but not what is trained.
NOT_A_SETTING = ("train.seed", "logging.", "train.checkpoint_every", "train.keep_checkpoints",
                 "train.log_every", "train.eval_every", "train.cpu_threads", "data.shards",
                 "data.source", "algorithm.vectorize", "eval.batch_size")
LABEL_KEYS = 3
# Training seconds so far, summed over resumed segments, if the trainer logs it (it does not yet);
# otherwise wall time comes from W&B's `_runtime`.
ELAPSED_KEY = "perf/elapsed_s"


@dataclass
class RunSummary:
    """What the comparison knows about one run."""

    name: str
    config: str
    seed: Optional[int]
    steps: int
    """Last step the run logged."""
    target_steps: Optional[int]
    val_acc: Optional[float] = None
    val_ci95: Optional[float] = None
    test_acc: Optional[float] = None
    test_ci95: Optional[float] = None
    tasks_per_s: Optional[float] = None
    """Median of the logged training throughput (tasks per second over all processes)."""
    wall_time_s: Optional[float] = None
    """Seconds from the start of training to the last logged row, summed over resumed segments
    (the trainer's `perf/elapsed_s` if logged, else W&B's `_runtime`; unknown without either)."""
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    setting: tuple = ()
    """The flattened config without the seed: runs with equal settings are seeds of one config."""
    source: str = ""
    config_changes: list[dict] = field(default_factory=list)
    """The config changes of the run's resumes (run.json): key, old, new, step, kind."""

    @property
    def finished(self) -> bool:
        return self.target_steps is not None and self.steps >= self.target_steps


@dataclass
class GroupSummary:
    """The runs of one setting (its seeds), and their means and standard deviations."""

    label: str
    runs: list[RunSummary]

    def mean_std(self, attr: str) -> tuple[Optional[float], Optional[float]]:
        values = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)

    def curve(self, attr: str) -> list[tuple[int, float, float, int]]:
        """(step, mean, std, runs) at each step any seed logged."""
        by_step: dict[int, list[float]] = {}
        for run in self.runs:
            for step, value in getattr(run, attr):
                by_step.setdefault(step, []).append(value)
        return [(step, statistics.fmean(v), statistics.pstdev(v), len(v))
                for step, v in sorted(by_step.items())]


# ---------------------------------------------------------------- collecting


def from_rows(name: str, config: dict, rows: list[dict], *, evaluation: Optional[dict] = None,
              wall_time_s: Optional[float] = None, source: str = "") -> RunSummary:
    """A run from its resolved config (nested dict), its logged rows ({"step": n, key: value})
    and, if any, its final evaluation (eval.json)."""
    train = config.get("train") or {}
    run = RunSummary(name=name, config=str(config.get("name", name)), seed=train.get("seed"),
                     steps=max((int(r["step"]) for r in rows if "step" in r), default=0),
                     target_steps=train.get("steps"), wall_time_s=wall_time_s, source=source,
                     setting=_setting(config))
    for row in rows:
        if "val/acc" in row:
            run.val_acc, run.val_ci95 = row["val/acc"], row.get("val/ci95")
            run.val_curve.append((int(row["step"]), float(row["val/acc"])))
        if "train/acc_after" in row:
            run.train_curve.append((int(row["step"]), float(row["train/acc_after"])))
        if "test/acc" in row:
            run.test_acc, run.test_ci95 = row["test/acc"], row.get("test/ci95")
    if evaluation and evaluation.get("part", "test") == "test":
        run.test_acc, run.test_ci95 = evaluation["mean"], evaluation.get("ci95")
    elapsed = [r[ELAPSED_KEY] for r in rows if _finite(r.get(ELAPSED_KEY))]
    if elapsed:  # the trainer's own clock, where it logs one, over W&B's
        run.wall_time_s = max(elapsed)
    speeds = [r["perf/tasks_per_s"] for r in rows if _finite(r.get("perf/tasks_per_s"))]
    run.tasks_per_s = statistics.median(speeds) if speeds else None
    return run


def from_run_dir(run_dir: str | Path) -> RunSummary:
    """A run from its folder alone: config.yaml, metrics.jsonl, eval.json, wandb/ (offline)."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a run folder "
                                "(or not started yet)")
    config = yaml.safe_load(config_file.read_text()) or {}
    rows = read_metrics(run_dir)
    segments = [read_run(path) for path in find_run_files(run_dir)]
    if not rows and segments:  # no local metrics file: W&B's history has the same rows
        rows = _merge_histories(segments)
    evaluation = None
    if (run_dir / "eval.json").is_file():
        evaluation = json.loads((run_dir / "eval.json").read_text())
    wall = sum(_runtime(s) for s in segments) if segments else None
    run = from_rows(run_dir.name, config, rows, evaluation=evaluation, wall_time_s=wall,
                    source=str(run_dir))
    run.config_changes = recorded_changes(run_dir)
    return run


def from_wandb(path: str, group: str, api=None) -> list[RunSummary]:
    """The runs of W&B group `group` in project `path` ("entity/project"), through the W&B API
    (needs the network and an API key)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs = []
    for run in api.runs(path, filters={"group": group}):
        rows = [_wandb_row(row) for row in run.scan_history()]
        summary = dict(run.summary)
        runs.append(from_rows(run.name, dict(run.config), [r for r in rows if "step" in r],
                              wall_time_s=summary.get("_runtime"), source=run.url))
    return runs


def _wandb_row(row: dict) -> dict:
    out = {k: v for k, v in row.items() if not k.startswith("_") and v is not None}
    if row.get("_step") is not None:
        out["step"] = int(row["_step"])
    return out


def _merge_histories(segments: list[dict]) -> list[dict]:
    """One history from resumed segments: a later segment replaces the rows from its first step
    on."""
    rows: list[dict] = []
    for segment in segments:
        new = [_wandb_row(r) for r in segment["history"]]
        new = [r for r in new if "step" in r]
        if new:
            start = min(r["step"] for r in new)
            rows = [r for r in rows if r["step"] < start] + new
    return rows


def _runtime(segment: dict) -> float:
    times = [r["_runtime"] for r in segment["history"] if _finite(r.get("_runtime"))]
    if _finite(segment["summary"].get("_runtime")):
        times.append(segment["summary"]["_runtime"])
    return max(times, default=0.0)


def _setting(config: dict) -> tuple:
    flat = _flatten(config)
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in flat.items()
                        if not any(k == s or (s.endswith(".") and k.startswith(s))
                                   for s in NOT_A_SETTING)))


def _flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and key != "inner_lr":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- grouping


def aggregate(runs: Iterable[RunSummary]) -> list[GroupSummary]:
    """Group runs by setting (config without seed), in order of first appearance. A group is
    labelled by its config name, plus the keys that set it apart where two share a name."""
    groups: dict[tuple, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    by_name: dict[str, list[tuple]] = {}
    for setting, members in groups.items():
        by_name.setdefault(members[0].config, []).append(setting)
    out = []
    for setting, members in groups.items():
        name = members[0].config
        siblings = by_name[name]
        label = name
        if len(siblings) > 1:  # e.g. the grid points of one config file: name what differs
            settings = [dict(other) for other in siblings]
            keys = sorted({k for d in settings for k in d})
            differing = sorted((k for k in keys if len({d.get(k) for d in settings}) > 1),
                               key=_label_order)
            mine = dict(setting)
            label += " " + " ".join(
                f"{k.rsplit('.', 1)[-1]}={json.loads(mine[k]) if k in mine else '-'}"
                for k in differing[:LABEL_KEYS])
            if len(differing) > LABEL_KEYS:
                label += f" (+{len(differing) - LABEL_KEYS} more)"
        out.append(GroupSummary(label, sorted(members,
                                              key=lambda r: (r.seed is None, r.seed or 0))))
    return out


def _label_order(key: str) -> tuple:
    """What tells settings apart best comes first in a label: the task, model and algorithm."""
    sections = ("task", "model", "algorithm", "optim", "train", "data", "precision", "eval")
    section = key.split(".", 1)[0]
    return (sections.index(section) if section in sections else len(sections), key)


# ---------------------------------------------------------------- printing


def _acc(value, ci) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ± {ci:.2f}" if ci is not None else f"{value:.2f}"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean_std(pair, digits: int = 2) -> str:
    mean, std = pair
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


RUN_HEADER = ["run", "config", "seed", "steps", "val acc % (±95%)", "test acc % (±95%)",
              "tasks/s", "wall s"]
GROUP_HEADER = ["config", "seeds", "steps", "val acc % (mean ± std)", "test acc % (mean ± std)",
                "tasks/s", "wall s"]


def run_cells(run: RunSummary) -> list[str]:
    steps = (f"{run.steps}" if run.finished or run.target_steps is None
             else f"{run.steps}/{run.target_steps}")
    return [run.name, run.config, "-" if run.seed is None else str(run.seed), steps,
            _acc(run.val_acc, run.val_ci95), _acc(run.test_acc, run.test_ci95),
            _num(run.tasks_per_s), _num(run.wall_time_s, 0)]


def group_cells(group: GroupSummary) -> list[str]:
    steps = sorted({r.steps for r in group.runs})
    return [group.label, str(len(group.runs)), "/".join(str(s) for s in steps),
            _mean_std(group.mean_std("val_acc")), _mean_std(group.mean_std("test_acc")),
            _mean_std(group.mean_std("tasks_per_s"), 1),
            _mean_std(group.mean_std("wall_time_s"), 0)]


def format_runs(runs: list[RunSummary]) -> str:
    return _table(RUN_HEADER, [run_cells(r) for r in runs])


def format_changes(runs: list[RunSummary]) -> str:
    """A line per run whose config changed when it was resumed (run.json), or ""."""
    return "\n".join(f"{r.name}: config changed on resume: {describe(r.config_changes)}"
                     for r in runs if r.config_changes)


def format_groups(groups: list[GroupSummary]) -> str:
    return _table(GROUP_HEADER, [group_cells(g) for g in groups])


def write_csv(runs: list[RunSummary], path: str | Path) -> None:
    fields = ["name", "config", "seed", "steps", "target_steps", "val_acc", "val_ci95", "test_acc",
              "test_ci95", "tasks_per_s", "wall_time_s", "source"]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(fields)
    for run in runs:
        writer.writerow([getattr(run, f) for f in fields])
    atomic_write_text(Path(path), text.getvalue())


# ---------------------------------------------------------------- plotting


def plot_curves(groups: list[GroupSummary], path: str | Path, title: str = "") -> Path:
    """Validation accuracy and training query accuracy against step, one line per config (the
    mean over its seeds, shaded ± one standard deviation; thin lines are the single seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("val_curve", "validation accuracy (%)"),
              ("train_curve", "train query accuracy after adaptation"))
    for ax, (attr, ylabel) in zip(axes, panels):
        for i, group in enumerate(groups):
            color = f"C{i % 10}"
            for run in group.runs:
                points = getattr(run, attr)
                if points and len(group.runs) > 1:
                    ax.plot(*zip(*points), color=color, alpha=0.25, linewidth=0.8)
            curve = group.curve(attr)
            if not curve:
                continue
            steps, means, stds, _ = zip(*curve)
            ax.plot(steps, means, color=color, linewidth=1.8,
                    marker="o" if len(steps) < 20 else None, markersize=3,
                    label=f"{group.label} (n={len(group.runs)})")
            low = [m - s for m, s in zip(means, stds)]
            high = [m + s for m, s in zip(means, stds)]
            ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)
        ax.set_xlabel("meta-training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
