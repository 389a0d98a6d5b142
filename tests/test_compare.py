"""compare.py on run folders written here in the trainer's format (config.yaml, metrics.jsonl,
eval.json, offline W&B files): the right numbers in the table, mean ± std over seeds, grid points
kept apart, and a PNG of the learning curves."""

import json
import statistics
from pathlib import Path

import pytest

from fsl_dist.compare import (
    aggregate,
    format_groups,
    format_runs,
    from_rows,
    from_run_dir,
    from_wandb,
    plot_curves,
)
from fsl_dist.config import load_config, save_config

from launching import ROOT, run

CONFIGS = ROOT / "configs"


def fake_run(folder: Path, config: str, seed: int, *, steps: int = 4, val=(), test=None,
             speed: float = 10.0, extra=()) -> Path:
    """A finished run folder as the trainer writes it."""
    cfg = load_config(CONFIGS / f"{config}.yaml",
                      [f"train.seed={seed}", f"train.steps={steps}", *extra])
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "train/loss": 1.0 / step, "train/acc_after": 0.2 + 0.1 * step,
                     "perf/tasks_per_s": speed + step % 2, "perf/step_time": 0.1})
    for step, (acc, ci) in val:
        rows.append({"step": step, "val/acc": acc, "val/ci95": ci, "val/episodes": 10})
    if test is not None:
        rows.append({"step": steps, "test/acc": test[0], "test/ci95": test[1]})
        (folder / "eval.json").write_text(json.dumps({"mean": test[0], "ci95": test[1], "std": 1.0,
                                                      "episodes": 10, "part": "test"}))
    rows.sort(key=lambda r: r["step"])
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def sweep_folders(tmp_path):
    return [
        fake_run(tmp_path / "cnn_maml-s0", "cnn_maml", 0, val=[(2, (40.0, 5.0)), (4, (50.0, 4.0))],
                 test=(52.0, 3.0)),
        fake_run(tmp_path / "cnn_maml-s1", "cnn_maml", 1, val=[(2, (42.0, 5.0)), (4, (54.0, 4.5))],
                 test=(56.0, 2.0)),
        fake_run(tmp_path / "cnn_boil-s0", "cnn_boil", 0, val=[(2, (45.0, 5.0)), (4, (60.0, 3.0))],
                 test=(61.0, 2.5), speed=20),
        fake_run(tmp_path / "cnn_boil-s1", "cnn_boil", 1, val=[(2, (47.0, 5.0)), (4, (62.0, 3.5))],
                 test=(65.0, 2.0), speed=20),
    ]


def test_a_run_folder_gives_the_right_numbers(sweep_folders):
    first = from_run_dir(sweep_folders[0])
    assert (first.name, first.config, first.seed, first.steps, first.finished) == (
        "cnn_maml-s0", "cnn_maml", 0, 4, True)
    assert (first.val_acc, first.val_ci95, first.test_acc, first.test_ci95) == (
        50.0, 4.0, 52.0, 3.0)
    assert first.tasks_per_s == statistics.median([11, 10, 11, 10])
    assert first.val_curve == [(2, 40.0), (4, 50.0)] and len(first.train_curve) == 4
    assert first.wall_time_s is None  # no W&B files here


def test_aggregate_gives_mean_and_std_over_seeds(sweep_folders):
    groups = aggregate([from_run_dir(d) for d in sweep_folders])
    assert [g.label for g in groups] == ["cnn_maml", "cnn_boil"]
    assert [len(g.runs) for g in groups] == [2, 2]
    mean, std = groups[0].mean_std("test_acc")
    assert mean == pytest.approx(54.0) and std == pytest.approx(statistics.stdev([52.0, 56.0]))
    assert groups[1].mean_std("val_acc") == (pytest.approx(61.0),
                                             pytest.approx(statistics.stdev([60.0, 62.0])))


def test_run_table_has_the_right_numbers(sweep_folders):
    table = format_runs([from_run_dir(d) for d in sweep_folders])
    assert "cnn_maml-s1  cnn_maml  1     4      54.00 ± 4.50" in table
    assert "56.00 ± 2.00" in table


def test_group_table_has_the_right_numbers(sweep_folders):
    summary = format_groups(aggregate([from_run_dir(d) for d in sweep_folders]))
    assert "cnn_maml  2      4      52.00 ± 2.83" in summary and "54.00 ± 2.83" in summary
    assert "63.00 ± 2.83" in summary  # cnn_boil test: mean of 61 and 65


def test_unfinished_runs_show_their_progress(tmp_path):
    folder = fake_run(tmp_path / "r", "cnn_maml", 0, steps=4)
    config = (folder / "config.yaml").read_text().replace("steps: 4", "steps: 10")
    (folder / "config.yaml").write_text(config)
    run_ = from_run_dir(folder)
    assert not run_.finished and "4/10" in format_runs([run_]) and run_.test_acc is None


def test_grid_points_of_one_config_are_not_averaged_together(tmp_path):
    runs = [from_run_dir(fake_run(tmp_path / f"k{k}-s{s}", "cnn_maml", s,
                                  extra=[f"task.k_shot={k}"], test=(50.0 + k + s, 1.0)))
            for k in (1, 5) for s in (0, 1)]
    groups = aggregate(runs)
    assert [g.label for g in groups] == ["cnn_maml k_shot=1", "cnn_maml k_shot=5"]
    assert groups[1].mean_std("test_acc")[0] == pytest.approx(55.5)


def test_png_of_learning_curves(sweep_folders, tmp_path):
    path = plot_curves(aggregate([from_run_dir(d) for d in sweep_folders]),
                       tmp_path / "out" / "c.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.integration  # wandb.init starts W&B's service process (and git)
def test_offline_wandb_files_give_wall_time_and_stand_in_for_metrics(tmp_path, monkeypatch):
    """Two offline W&B segments of one run (a resume): wall time is the sum of their runtimes;
    without metrics.jsonl, W&B's history gives the same rows."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = fake_run(tmp_path / "cnn_maml-s0", "cnn_maml", 0, val=[(4, (50.0, 4.0))],
                      test=(52.0, 3.0))
    run_id = None
    for steps in ((1, 2), (3, 4)):
        w = wandb.init(project="p", dir=str(folder), name=folder.name, group="g", id=run_id,
                       resume="allow", config={"name": "cnn_maml"})
        run_id = w.id
        for step in steps:
            w.log({"train/acc_after": 0.1 * step, "perf/tasks_per_s": 5.0,
                   **({"val/acc": 49.0} if step == 4 else {})}, step=step)
        w.finish()
    with_metrics = from_run_dir(folder)
    assert with_metrics.wall_time_s is not None and 0 < with_metrics.wall_time_s < 60
    assert with_metrics.val_acc == 50.0  # metrics.jsonl wins when present
    (folder / "metrics.jsonl").unlink()
    from_wandb_files = from_run_dir(folder)
    assert [s for s, _ in from_wandb_files.train_curve] == [1, 2, 3, 4]
    assert from_wandb_files.val_acc == 49.0 and from_wandb_files.tasks_per_s == 5.0


def test_wandb_api_runs_are_read_like_run_folders():
    class FakeRun:
        name, url = "cnn_maml-s3", "https://wandb.ai/e/p/runs/x"
        config = {"name": "cnn_maml", "train": {"seed": 3, "steps": 2}, "logging": {"group": "g"}}
        summary = {"_runtime": 12.5, "val/acc": 40.0}

        def scan_history(self):
            return [{"_step": 1, "train/acc_after": 0.3, "perf/tasks_per_s": 4.0, "_runtime": 1.0},
                    {"_step": 2, "val/acc": 40.0, "val/ci95": 2.0,
                     "test/acc": 41.0, "test/ci95": 1.5}]

    class FakeApi:
        def runs(self, path, filters):
            assert (path, filters) == ("e/p", {"group": "g"})
            return [FakeRun()]

    [got] = from_wandb("e/p", "g", api=FakeApi())
    assert (got.config, got.seed, got.steps, got.val_acc, got.test_acc, got.test_ci95,
            got.wall_time_s) == ("cnn_maml", 3, 2, 40.0, 41.0, 1.5, 12.5)


# The command line: one process per test, as many as before the split.
@pytest.mark.integration
def test_cli_prints_the_tables_and_writes_the_plot_and_csv(sweep_folders, tmp_path):
    out = run("compare.py", [*map(str, sweep_folders), "--plot", str(tmp_path / "c.png"),
                             "--csv", str(tmp_path / "runs.csv")]).stdout
    assert "cnn_boil-s1" in out and "63.00 ± 2.83" in out and (tmp_path / "c.png").is_file()
    assert len((tmp_path / "runs.csv").read_text().splitlines()) == 5


@pytest.mark.integration
def test_cli_names_a_folder_that_is_no_run(tmp_path):
    bad = run("compare.py", [str(tmp_path / "nothing")], check=False)
    assert bad.returncode == 2 and "no config.yaml" in bad.stderr


@pytest.mark.integration
def test_cli_without_folders_is_a_usage_error():
    assert run("compare.py", [], check=False).returncode == 2


def test_a_logged_elapsed_time_is_the_wall_time():
    got = from_rows("x", {"name": "c", "train": {"seed": 1, "steps": 2}},
                    [{"step": 1, "perf/elapsed_s": 3.0}, {"step": 2, "perf/elapsed_s": 7.5}],
                    wall_time_s=99.0)
    assert got.wall_time_s == 7.5


def test_from_rows_without_eval_uses_logged_test_rows():
    got = from_rows("x", {"name": "c", "train": {"seed": 1, "steps": 1}},
                    [{"step": 1, "test/acc": 33.0, "test/ci95": 1.0}])
    assert (got.test_acc, got.test_ci95, got.seed) == (33.0, 1.0, 1)
