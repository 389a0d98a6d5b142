"""Prediction agrees with evaluation on trained runs: for a MAML, a BOIL and an ANIL run trained
by `launch/train.py`, the prediction API adapted on each of 100 test episodes' support sets
reproduces the per-episode accuracies of evaluation, and so does fsl-predict on the episodes
written out as PNG class folders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fsl_dist.cli import predict as cli
from fsl_dist.config import load_config
from fsl_dist.evaluate import confidence_interval
from fsl_dist.predict import load_model

from launching import ROOT, child_env, run
from predicting import episodes, write_episode

EPISODES = 100
TRAINING = ["task.k_shot=1", "task.q_query=5", "model.width=16", "train.steps=30",
            "train.meta_batch_size=4", "train.log_every=10", "train.eval_every=30",
            "train.checkpoint_every=30", "eval.val_episodes=10", f"eval.episodes={EPISODES}",
            "eval.batch_size=25", "eval.inner_steps=3", "logging.wandb=false"]


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


@pytest.fixture(scope="module", params=["maml", "boil", "anil", "protonet",
                                        "protonet eval.test_shift=1"])
def trained(request, shards, tmp_path_factory):
    name, *overrides = request.param.split()
    run_dir = tmp_path_factory.mktemp("predict") / name
    run("train.py", ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--run-dir",
                     str(run_dir), f"data.shards={shards}", f"algorithm.name={name}",
                     *TRAINING, *overrides])
    return run_dir


def evaluation_per_episode(run_dir, model) -> torch.Tensor:
    """The per-episode accuracies of evaluation: evaluate()'s chunks through the learner."""
    cfg = load_config(run_dir / "config.yaml")
    tasks = episodes(cfg.data.shards, cfg.task.n_way, cfg.task.k_shot, cfg.task.q_query,
                     seed=cfg.eval.seed, count=EPISODES)
    chunks = []
    for start in range(0, EPISODES, cfg.eval.batch_size):
        chunk = {k: v[start:start + cfg.eval.batch_size] for k, v in tasks.items()}
        chunks.append(model.learner.evaluate_tasks(chunk, precision="no")["acc_after_per_task"])
    return torch.cat(chunks), tasks


def test_prediction_reproduces_evaluation_per_episode(trained, tmp_path, capsys):
    model = load_model(trained, "cpu")
    test_shift = load_config(trained / "config.yaml").eval.test_shift
    assert getattr(model.learner, "test_shift", 0) == test_shift  # model.yaml carries it
    expected, tasks = evaluation_per_episode(trained, model)
    # the same episodes and accuracies as the run's own final evaluation
    written = json.loads((trained / "eval.json").read_text())
    assert written["episodes"] == EPISODES
    assert confidence_interval(expected)["mean"] == written["mean"]
    assert 20 < written["mean"] < 100  # trained past chance (5-way: 20%)

    api, command = [], []
    for i in range(EPISODES):
        classifier = model.adapt(tasks["support_x"][i], tasks["support_y"][i])
        predicted = classifier.predict(tasks["query_x"][i]).indices
        api.append((predicted == tasks["query_y"][i]).float().mean().item())

        support, query = write_episode(tmp_path / f"episode{i}", tasks, i, inverted=True)
        out = tmp_path / f"episode{i}.json"
        assert cli.main(["--model", str(trained), "--support", str(support), "--query",
                         str(query), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
        command.append(json.loads(out.read_text())["accuracy"] / 100)
    capsys.readouterr()
    assert api == expected.tolist()
    # the command's accuracy is a float64 of the same count (float32 in evaluation)
    assert command == pytest.approx(expected.tolist(), abs=1e-7)


def test_the_installed_command_gives_the_same_predictions(trained, tmp_path):
    model = load_model(trained, "cpu")
    tasks = episodes(load_config(trained / "config.yaml").data.shards, 5, 1, 5,
                     seed=load_config(trained / "config.yaml").eval.seed, count=1)
    support, query = write_episode(tmp_path / "episode", tasks, 0, inverted=True)
    args = ["--model", str(trained), "--support", str(support), "--query", str(query)]
    assert cli.main([*args, "--out", str(tmp_path / "here.json"), "--quiet"]) == 0
    result = subprocess.run([sys.executable, "-m", "fsl_dist.cli.predict", *args, "--out",
                             str(tmp_path / "there.json")], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    here = json.loads((tmp_path / "here.json").read_text())["predictions"]
    there = json.loads((tmp_path / "there.json").read_text())["predictions"]
    assert [r["predicted"] for r in there] == [r["predicted"] for r in here]
    assert "predicted" in result.stdout and "accuracy" in result.stderr
    assert model.learner.evaluation_steps == (0 if trained.name == "protonet" else 3)
