"""Sweep files: parsing with errors that name the file and key, expansion order, run naming,
the arguments each array task gives train.py, and the launch commands (no SLURM needed)."""

from pathlib import Path

import pytest

from fsl_dist.config import load_config
from fsl_dist.slurm import accelerate_command, machine_of, processes_per_machine, visible_gpus
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


def test_expands_config_then_grid_then_seed_with_stable_names(tmp_path):
    path = write(tmp_path, sweep_text("overrides: {train.steps: 5, optim.lr: 1e-4}\n"
                                      "grid: {task.k_shot: [1, 5]}\nruns_dir: out\n"))
    sweep = load_sweep(path)
    runs = sweep.runs()
    assert len(sweep) == len(runs) == 8 and sweep.array_spec() == "0-7"
    assert [(r.config_name, dict(r.grid)["task.k_shot"], r.seed) for r in runs[:4]] == [
        ("cnn_maml", 1, 3), ("cnn_maml", 1, 7), ("cnn_maml", 5, 3), ("cnn_maml", 5, 7)]
    assert runs[4].config_name == "cnn_boil"
    assert runs[2].name == "cnn_maml-k_shot=5-s3"
    assert sweep.name == "sw" and sweep.run_dir(runs[2]) == Path("out/sw/cnn_maml-k_shot=5-s3")
    args = sweep.train_args(runs[2])
    assert args[:6] == ["--config", str(CONFIGS / "cnn_maml.yaml"), "--run-dir", "out/sw/cnn_maml-k_shot=5-s3",
                        "--resume", "auto"]
    assert args[6:] == ["train.steps=5", "optim.lr=1e-4", "task.k_shot=5", "train.seed=3", "logging.group=sw"]
    cfg = load_config(runs[2].config, sweep.config_overrides(runs[2]))
    assert (cfg.train.seed, cfg.task.k_shot, cfg.train.steps, cfg.optim.lr, cfg.logging.group) == (3, 5, 5, 1e-4, "sw")
    sweep.check()
    table = describe(sweep)
    assert "cnn_boil-k_shot=1-s7" in table and "8 runs (sbatch --array=0-7)" in table


def test_values_reach_the_config_unchanged_even_when_a_shell_would_mangle_them(tmp_path):
    for value in ["a b; rm -rf /", "$(touch x)", "'quoted'", "1e-4", "true", "null", "x*"]:
        assert load_config(CONFIGS / "cnn_maml.yaml", [f"logging.tags=[{format_value(value)}]"]).logging.tags == [value]
    path = write(tmp_path, sweep_text("overrides:\n  logging.tags: ['a b; echo pwned', '$(id)']\n"
                                      "  algorithm.inner_lr: {features: 0.3, classifier: 0.5}\n"))
    sweep = load_sweep(path)
    run = sweep.run(0)
    cfg = load_config(run.config, sweep.config_overrides(run))
    assert cfg.logging.tags == ["a b; echo pwned", "$(id)"]
    assert cfg.algorithm.inner_lr == {"features": 0.3, "classifier": 0.5}
    # the run folder name keeps only safe characters
    path = write(tmp_path, sweep_text("grid: {logging.project: ['a b/c', d]}\n"), "g.yaml")
    assert load_sweep(path).runs()[0].name == "cnn_maml-project=a_b_c-s3"


def test_seed_count_and_name(tmp_path):
    sweep = load_sweep(write(tmp_path, sweep_text().replace("[3, 7]", "3") + "name: my-sweep\n"))
    assert sweep.seeds == (0, 1, 2) and sweep.name == "my-sweep" and len(sweep) == 6


def test_config_paths_are_relative_to_the_sweep_file():
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "four_systems.yaml")
    assert [c.name for c in sweep.configs] == ["cnn_maml.yaml", "cnn_boil.yaml", "resnet_maml.yaml", "resnet_boil.yaml"]
    assert len(sweep) == 12
    sweep.check()
    load_sweep(ROOT / "configs" / "sweeps" / "cnn_shots.yaml").check()


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


def test_check_catches_a_bad_override_before_submission(tmp_path):
    sweep = load_sweep(write(tmp_path, sweep_text("grid: {task.n_way: [5, -1]}\n")))
    with pytest.raises(SweepError, match=r"run 2 \(cnn_maml-n_way=-1-s3\).*task.n_way"):
        sweep.check()
    sweep = load_sweep(write(tmp_path, sweep_text("overrides: {train.stepz: 3}\n")))
    with pytest.raises(SweepError, match="unknown key `train.stepz`"):
        sweep.check()


def test_index_out_of_range(tmp_path):
    sweep = load_sweep(write(tmp_path, sweep_text()))
    with pytest.raises(SweepError, match=r"array index 4 is out of range; this sweep has 4 runs \(indices 0-3\)"):
        sweep.run(4)


def test_processes_follow_the_allocation():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpus({"SLURM_GPUS_ON_NODE": "4"}) == 4
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1", "ACCELERATE_USE_CPU": "1"}) == 0
    assert processes_per_machine({"CUDA_VISIBLE_DEVICES": "2,5"}, cpu_processes=3) == (2, True)
    assert processes_per_machine({"CUDA_VISIBLE_DEVICES": ""}, cpu_processes=3) == (3, False)
    assert machine_of({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        machine_of({})


def test_accelerate_commands():
    argv, env = accelerate_command("t.py", ["--x", "a b"], processes=1, on_gpu=False, base_env={})
    assert argv[-3:] == ["t.py", "--x", "a b"] and "--multi_gpu" not in argv and env["ACCELERATE_USE_CPU"] == "1"
    argv, env = accelerate_command("t.py", [], processes=4, on_gpu=True, base_env={}, main_port=1234)
    assert argv[argv.index("--num_processes") + 1] == "4" and "--multi_gpu" in argv
    assert argv[argv.index("--main_process_port") + 1] == "1234" and "ACCELERATE_USE_CPU" not in env
    argv, _ = accelerate_command("t.py", [], processes=2, on_gpu=True, base_env={}, num_machines=3,
                                 machine_rank=2, main_address="10.0.0.1", main_port=5)
    flags = dict(zip(argv[3:-1:2], argv[4:-1:2]))
    assert argv[argv.index("--num_processes") + 1] == "6"
    assert argv[argv.index("--machine_rank") + 1] == "2" and argv[argv.index("--main_process_ip") + 1] == "10.0.0.1"
    assert flags["--num_machines"] == "3"


@pytest.mark.integration
def test_cli_list_and_submit_dry_run(tmp_path):
    path = write(tmp_path, sweep_text())
    out = run("sweep.py", ["list", str(path)]).stdout
    assert "cnn_boil-s7" in out and "4 runs" in out
    out = run("sweep.py", ["submit", "--dry-run", str(path), "--time=5", "--gpus-per-node=2"]).stdout
    assert "sbatch --array=0-3 --job-name=fsl-sw" in out and "--time=5 --gpus-per-node=2" in out
    assert str(ROOT / "launch" / "slurm" / "array.sbatch") in out
    out = run("sweep.py", ["run", str(path), "--index", "3", "--dry-run"],
              env=_env(CUDA_VISIBLE_DEVICES="")).stdout
    assert "cnn_boil seed 7" in out and "train.seed=7 logging.group=sw" in out
    bad = run("sweep.py", ["list", str(tmp_path / "nope.yaml")], check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def _env(**extra):
    from launching import child_env

    return child_env(**extra)
