"""Each of the four systems trains end to end through `accelerate launch`, evaluates, and leaves
the whole run folder, W&B offline files included; bad configs fail before training."""

from __future__ import annotations

import json

import pytest
import yaml

from fsl_dist.config import load_config
from fsl_dist.cpu_malloc import START_TUNABLES
from fsl_dist.wandb_offline import find_run_files, read_run

from launching import ROOT, config_args, run

SYSTEMS = ("cnn_maml", "cnn_boil", "resnet_maml", "resnet_boil")


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


@pytest.mark.parametrize("name", SYSTEMS)
def test_system_trains_evaluates_and_leaves_its_run_folder(name, shards, tmp_path):
    run_dir = tmp_path / name
    run("train.py", config_args(name, run_dir, shards), processes=1)

    for expected in ("config.yaml", "run.json", "metrics.jsonl", "model.safetensors",
                     "model.yaml", "eval.json"):
        assert (run_dir / expected).is_file(), expected
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000001.pt", "step-00000002.pt"]
    assert load_config(run_dir / "config.yaml").name == name
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 1 and info["precision"] == "no" and info["packages"]["torch"]
    # the README's command on CPU: the process started again under the start-up tunables
    assert info.get("glibc_tunables") == (START_TUNABLES if info["device"] == "cpu" else None)
    assert info.get("cpu_allocator") == ("glibc" if info["device"] == "cpu" else None)
    model = yaml.safe_load((run_dir / "model.yaml").read_text())
    assert (model["model"]["name"] == name.split("_")[0]
            and model["algorithm"]["name"] == name.split("_")[1])

    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["episodes"] == 10 and evaluation["part"] == "test"
    assert 0 <= evaluation["mean"] <= 100 and evaluation["ci95"] > 0

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert any("val/acc" in r for r in rows) and any("test/acc" in r for r in rows)

    # W&B, offline (no API key in tests): the binary run file holds what was logged.
    (wandb_file,) = find_run_files(run_dir)
    logged = read_run(wandb_file)
    assert logged["meta"]["group"] == name and logged["meta"]["name"] == run_dir.name
    assert logged["config"]["model"]["name"] == name.split("_")[0]
    history = logged["history"]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert losses == pytest.approx([r["train/loss"] for r in train_rows], rel=1e-6)
    for key in ("train/acc_before", "train/acc_after", "train/inner_loss", "train/grad_norm", "lr",
                "perf/tasks_per_s", "perf/step_time", "perf/allreduce_time", "perf/peak_memory_mb",
                "val/acc", "val/ci95", "test/acc", "test/ci95"):
        assert any(key in h for h in history), key
    assert logged["meta"].get("exit_code", 0) == 0


def test_evaluate_divides_episodes_among_two_processes(shards, tmp_path):
    run_dir = tmp_path / "cnn_maml"
    run("train.py", config_args("cnn_maml", run_dir, shards, "logging.wandb=false"))
    one = run("evaluate.py", ["--run-dir", str(run_dir), "--episodes", "12", "--out", "one.json"])
    two = run("evaluate.py", ["--run-dir", str(run_dir), "--episodes", "12", "--out", "two.json",
                              "--inner-steps", "2"], processes=2)
    a = json.loads((run_dir / "one.json").read_text())
    b = json.loads((run_dir / "two.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1 and a["episodes"] == b["episodes"] == 12
    assert (a["mean"] == pytest.approx(b["mean"], abs=1e-9)
            and a["ci95"] == pytest.approx(b["ci95"], abs=1e-9))
    assert one.returncode == two.returncode == 0


def test_evaluate_reads_a_kept_checkpoint_and_names_the_weights(shards, tmp_path):
    run_dir = tmp_path / "cnn_maml"
    run("train.py", config_args("cnn_maml", run_dir, shards, "logging.wandb=false"))
    args = ["--run-dir", str(run_dir), "--episodes", "12"]
    run("evaluate.py", [*args, "--out", "final.json"])
    run("evaluate.py", [*args, "--out", "last.json", "--checkpoint", "2"])
    run("evaluate.py", [*args, "--out", "first.json", "--checkpoint", "1"])
    final, last, first = (json.loads((run_dir / f"{n}.json").read_text())
                          for n in ("final", "last", "first"))
    assert final["weights"] == "model.safetensors"
    assert (last["weights"] == "checkpoints/step-00000002.pt"
            and first["weights"] == "checkpoints/step-00000001.pt")
    # the final model is the step-2 checkpoint's model: the same episodes, the same accuracy
    assert last["mean"] == final["mean"] and last["ci95"] == final["ci95"]
    missing = run("evaluate.py", [*args, "--checkpoint", "7"], check=False)
    assert missing.returncode == 2
    assert ("step-00000007.pt does not exist" in missing.stderr
            and "step-00000002.pt" in missing.stderr)
    nested = run("evaluate.py", [*args, "--out", "runs/x/eval.json"], check=False)
    assert nested.returncode == 2 and "--out runs/x/eval.json" in nested.stderr
    assert not (run_dir / "runs").exists()


def test_debug_mode_runs_a_few_printed_steps(shards, tmp_path):
    result = run("train.py", ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--debug",
                              "--run-dir", str(tmp_path / "dbg"), f"data.shards={shards}",
                              "model.width=8", "train.steps=2", "train.eval_every=2",
                              "train.checkpoint_every=2", "task.k_shot=1", "task.q_query=2"])
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and "acc" in lines[0] and "|g|" in lines[0] and "tasks/s" in lines[0]
    assert not (tmp_path / "dbg" / "wandb").exists()  # W&B is off in debug mode


@pytest.mark.parametrize("override, message", [
    ("task.n_way=27", "`task.n_way` = 27 is larger than the 26 classes of the test part"),
    ("task.q_query=20", "`task.k_shot` + `task.q_query`"),
    ("train.stepz=10", "unknown key `train.stepz`"),  # every other key/type error: test_config.py
    ("precision=fp16", "needs a CUDA GPU"),
])
def test_bad_config_values_fail_before_training(override, message, shards, tmp_path):
    result = run("train.py", config_args("cnn_maml", tmp_path / "run", shards, override),
                 check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_shards_say_how_to_make_them(tmp_path):
    missing = tmp_path / "no-such-shards"
    result = run("train.py", ["--config", str(ROOT / "configs" / "cnn_maml.yaml"),
                              "--run-dir", str(tmp_path / "run"), f"data.shards={missing}",
                              f"data.source={tmp_path / 'no-omniglot-here'}"], check=False)
    assert result.returncode == 2
    assert "python launch/pack.py omniglot" in result.stderr and str(missing) in result.stderr
    assert not missing.exists()


def test_missing_shards_are_packed_when_the_source_is_known(tmp_path, omniglot_source):
    shards_dir = tmp_path / "shards"
    run("train.py", config_args("cnn_maml", tmp_path / "run", shards_dir,
                                f"data.source={omniglot_source}", "logging.wandb=false",
                                "train.steps=1", "train.eval_every=1"))
    assert json.loads((shards_dir / "manifest.json").read_text())["split"] == "futurama"
    assert (tmp_path / "run" / "eval.json").is_file()
