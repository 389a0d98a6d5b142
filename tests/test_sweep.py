"""Sweep files: parsing with errors that name the file and key, expansion order, run naming,
the arguments each array task gives train.py, and the launch commands (no SLURM needed)."""

from pathlib import Path

import pytest

from fsl_dist.config import load_config
from fsl_dist.slurm import (
    accelerate_command,
    gloo_interface,
    interface_towards,
    machine_of,
    processes_per_machine,
    visible_gpus,
)
from fsl_dist.sweep import SweepError, describe, format_value, load_sweep

from launching import ROOT, run

CONFIGS = ROOT / "configs"


def write(tmp_path: Path, text: str, name: str = "sw.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def sweep_text(extra: str = "") -> str:
    return (f"configs: [{CONFIGS / 'cnn_maml.yaml'}, {CONFIGS / 'cnn_boil.yaml'}]\n"
            f"seeds: [3, 7]\n{extra}")


def grid_sweep(tmp_path):
    """Two configs x a two-point grid x two seeds: 8 runs."""
    return load_sweep(write(tmp_path, sweep_text("overrides: {train.steps: 5, optim.lr: 1e-4}\n"
                                                 "grid: {task.k_shot: [1, 5]}\nruns_dir: out\n")))


def test_expands_config_then_grid_then_seed(tmp_path):
    sweep = grid_sweep(tmp_path)
    runs = sweep.runs()
    assert len(sweep) == len(runs) == 8 and sweep.array_spec() == "0-7"
    assert [(r.config_name, dict(r.grid)["task.k_shot"], r.seed) for r in runs[:4]] == [
        ("cnn_maml", 1, 3), ("cnn_maml", 1, 7), ("cnn_maml", 5, 3), ("cnn_maml", 5, 7)]
    assert runs[4].config_name == "cnn_boil"


def test_run_names_and_folders_are_stable(tmp_path):
    sweep = grid_sweep(tmp_path)
    run = sweep.runs()[2]
    assert run.name == "cnn_maml-k_shot=5-s3"
    assert sweep.name == "sw" and sweep.run_dir(run) == Path("out/sw/cnn_maml-k_shot=5-s3")


def test_train_args_of_a_run(tmp_path):
    sweep = grid_sweep(tmp_path)
    args = sweep.train_args(sweep.runs()[2])
    assert args[:6] == ["--config", str(CONFIGS / "cnn_maml.yaml"),
                        "--run-dir", "out/sw/cnn_maml-k_shot=5-s3", "--resume", "auto"]
    assert args[6:] == ["train.steps=5", "optim.lr=1e-4", "task.k_shot=5", "train.seed=3",
                        "logging.group=sw"]


def test_a_runs_overrides_give_its_config(tmp_path):
    sweep = grid_sweep(tmp_path)
    run = sweep.runs()[2]
    cfg = load_config(run.config, sweep.config_overrides(run))
    assert (cfg.train.seed, cfg.task.k_shot, cfg.train.steps, cfg.optim.lr, cfg.logging.group) == (
        3, 5, 5, 1e-4, "sw")
    sweep.check()


def test_describe_lists_the_runs_and_the_array(tmp_path):
    table = describe(grid_sweep(tmp_path))
    assert "cnn_boil-k_shot=1-s7" in table and "8 runs (sbatch --array=0-7)" in table


# Values reach the config unchanged even where a shell would mangle them.
@pytest.mark.parametrize("value", ["a b; rm -rf /", "$(touch x)", "'quoted'", "1e-4", "true",
                                   "null", "x*"])
def test_a_formatted_value_reads_back_unchanged(value):
    overrides = [f"logging.tags=[{format_value(value)}]"]
    assert load_config(CONFIGS / "cnn_maml.yaml", overrides).logging.tags == [value]


def test_sweep_overrides_reach_the_config_unchanged(tmp_path):
    path = write(tmp_path, sweep_text("overrides:\n  logging.tags: ['a b; echo pwned', '$(id)']\n"
                                      "  algorithm.inner_lr: {features: 0.3, classifier: 0.5}\n"))
    sweep = load_sweep(path)
    run = sweep.run(0)
    cfg = load_config(run.config, sweep.config_overrides(run))
    assert cfg.logging.tags == ["a b; echo pwned", "$(id)"]
    assert cfg.algorithm.inner_lr == {"features": 0.3, "classifier": 0.5}


def test_the_run_folder_name_keeps_only_safe_characters(tmp_path):
    path = write(tmp_path, sweep_text("grid: {logging.project: ['a b/c', d]}\n"), "g.yaml")
    assert load_sweep(path).runs()[0].name == "cnn_maml-project=a_b_c-s3"


def test_seed_count_and_name(tmp_path):
    sweep = load_sweep(write(tmp_path, sweep_text().replace("[3, 7]", "3") + "name: my-sweep\n"))
    assert sweep.seeds == (0, 1, 2) and sweep.name == "my-sweep" and len(sweep) == 6


def test_config_paths_are_relative_to_the_sweep_file():
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "four_systems.yaml")
    assert [c.name for c in sweep.configs] == ["cnn_maml.yaml", "cnn_boil.yaml", "resnet_maml.yaml",
                                               "resnet_boil.yaml"]
    assert len(sweep) == 12


@pytest.mark.parametrize("name", ["four_systems", "cnn_shots"])
def test_the_shipped_sweeps_pass_their_check(name):
    load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml").check()


@pytest.mark.parametrize("given", ["cnn_shots", "cnn_shots.yaml", "configs/sweeps/cnn_shots.yaml"])
def test_a_shipped_sweep_is_found_by_name_from_any_folder(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here, as for a wheel user
    assert load_sweep(given).path == ROOT / "configs" / "sweeps" / "cnn_shots.yaml"


def test_an_unknown_sweep_names_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SweepError, match="no sweep of that name ships .*shipped: cnn_shots, "
                                         "four_systems"):
        load_sweep("cnn_shot")


@pytest.mark.parametrize("text, message", [
    ("configs: [x.yaml]\nseeds: [0]\n", "`configs` entry 'x.yaml' does not exist"),
    ("seeds: [0]\n", "`configs` must be a non-empty list"),
    ("SWEEP\nseeds: [0, 0]\n", "`seeds` lists a seed twice"),
    ("SWEEP\nseeds: [a]\n", "`seeds` must be a list of non-negative integers"),
    ("SWEEP\nseeds: [0]\nsteps: 3\n", "unknown key `steps`"),
    ("SWEEP\nseeds: [0]\noverrides: {train.seed: 3}\n", "`overrides.train.seed` cannot be set"),
    ("SWEEP\nseeds: [0]\ngrid: {logging.group: [a]}\n", "`grid.logging.group` cannot be set"),
    ("SWEEP\nseeds: [0]\ngrid: {task.k_shot: 1}\n", "`grid.task.k_shot` must be a non-empty list"),
    ("SWEEP\nseeds: [0]\noverrides: {a: 1}\ngrid: {a: [1]}\n", "`a` is in both"),
    ("SWEEP\nseeds: [0]\nname: 'a b'\n", "`name` = 'a b'"),
    ("SWEEP\nseeds: [0]\ncpu_processes: 0\n", "`cpu_processes` must be a positive integer"),
    ("[1, 2]\n", "must hold a mapping"),
])
def test_bad_sweep_files_name_the_file_and_key(tmp_path, text, message):
    text = text.replace("SWEEP\n", f"configs: [{CONFIGS / 'cnn_maml.yaml'}]\n")
    path = write(tmp_path, text)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("extra, message", [
    ("grid: {task.n_way: [5, -1]}\n", r"run 2 \(cnn_maml-n_way=-1-s3\).*task.n_way"),
    ("overrides: {train.stepz: 3}\n", "unknown key `train.stepz`"),
], ids=["bad-grid-value", "unknown-override-key"])
def test_check_catches_a_bad_override_before_submission(tmp_path, extra, message):
    sweep = load_sweep(write(tmp_path, sweep_text(extra)))
    with pytest.raises(SweepError, match=message):
        sweep.check()


def test_index_out_of_range(tmp_path):
    sweep = load_sweep(write(tmp_path, sweep_text()))
    with pytest.raises(SweepError, match=r"array index 4 is out of range; "
                                         r"this sweep has 4 runs \(indices 0-3\)"):
        sweep.run(4)


@pytest.mark.parametrize("env, gpus", [
    ({"CUDA_VISIBLE_DEVICES": "0,1,3"}, 3),
    ({"CUDA_VISIBLE_DEVICES": ""}, 0),
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"CUDA_VISIBLE_DEVICES": "0,1", "ACCELERATE_USE_CPU": "1"}, 0),
], ids=["cuda-3", "cuda-none", "slurm-4", "forced-cpu"])
def test_visible_gpus_follow_the_allocation(env, gpus):
    assert visible_gpus(env) == gpus


@pytest.mark.parametrize("gpus, expected", [("2,5", (2, True)), ("", (3, False))],
                         ids=["gpus", "cpu"])
def test_processes_follow_the_allocation(gpus, expected):
    assert processes_per_machine({"CUDA_VISIBLE_DEVICES": gpus}, cpu_processes=3) == expected


def test_machine_of_reads_slurms_task():
    assert machine_of({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)


def test_machine_of_outside_slurm_names_the_variable():
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        machine_of({})


def test_accelerate_command_for_one_cpu_process():
    argv, env = accelerate_command("t.py", ["--x", "a b"], processes=1, on_gpu=False, base_env={})
    assert argv[-3:] == ["t.py", "--x", "a b"] and "--multi_gpu" not in argv
    assert env["ACCELERATE_USE_CPU"] == "1"


def test_accelerate_command_for_four_gpus():
    argv, env = accelerate_command("t.py", [], processes=4, on_gpu=True, base_env={},
                                   main_port=1234)
    assert argv[argv.index("--num_processes") + 1] == "4" and "--multi_gpu" in argv
    assert argv[argv.index("--main_process_port") + 1] == "1234" and "ACCELERATE_USE_CPU" not in env


def test_accelerate_command_for_three_machines():
    argv, _ = accelerate_command("t.py", [], processes=2, on_gpu=True, base_env={}, num_machines=3,
                                 machine_rank=2, main_address="10.0.0.1", main_port=5)
    flags = dict(zip(argv[3:-1:2], argv[4:-1:2]))
    assert argv[argv.index("--num_processes") + 1] == "6"
    assert (argv[argv.index("--machine_rank") + 1] == "2"
            and argv[argv.index("--main_process_ip") + 1] == "10.0.0.1")
    assert flags["--num_machines"] == "3"


def test_the_interface_towards_an_address_is_the_one_the_kernel_routes_through():
    assert interface_towards("127.0.0.1") == ("lo", "127.0.0.1")


def test_gloo_keeps_its_own_choice_on_loopback_and_the_users_setting():
    # two "machines" on one host meet at 127.0.0.1: gloo's choice from the hostname works there
    assert gloo_interface({}, "127.0.0.1") is None
    assert gloo_interface({"GLOO_SOCKET_IFNAME": "ib0"}, "10.0.0.1") == "ib0"
    # (a real address, across network namespaces: tests/test_slurm_netns.py)


# The command line: one process per test, as many as before the split.
@pytest.mark.integration
def test_cli_list(tmp_path):
    out = run("sweep.py", ["list", str(write(tmp_path, sweep_text()))]).stdout
    assert "cnn_boil-s7" in out and "4 runs" in out


@pytest.mark.integration
def test_cli_submit_dry_run(tmp_path):
    path = write(tmp_path, sweep_text())
    out = run("sweep.py", ["submit", "--dry-run", str(path), "--time=5",
                           "--gpus-per-node=2"]).stdout
    assert "sbatch --array=0-3 --job-name=fsl-sw" in out and "--time=5 --gpus-per-node=2" in out
    assert str(ROOT / "launch" / "slurm" / "array.sbatch") in out


@pytest.mark.integration
def test_cli_run_dry_run(tmp_path):
    path = write(tmp_path, sweep_text())
    out = run("sweep.py", ["run", str(path), "--index", "3", "--dry-run"],
              env=_env(CUDA_VISIBLE_DEVICES="")).stdout
    assert "cnn_boil seed 7" in out and "train.seed=7 logging.group=sw" in out


@pytest.mark.integration
def test_cli_names_a_missing_sweep_file(tmp_path):
    bad = run("sweep.py", ["list", str(tmp_path / "nope.yaml")], check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def _env(**extra):
    from launching import child_env

    return child_env(**extra)


def test_submit_into_a_runs_dir_under_a_file_is_one_line_before_sbatch(tmp_path, capsys):
    from fsl_dist.cli import sweep as cli

    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    sweep = write(tmp_path, sweep_text())
    assert cli.main(["submit", "--runs-dir", str(notes / "runs"), str(sweep)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{notes} is a file, not a folder" in errors[0]
    assert notes.read_text() == "mine\n"  # and no sbatch started: the fast tier forbids it
