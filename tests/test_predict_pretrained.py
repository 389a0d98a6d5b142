"""A pre-trained backbone (fsl-pretrain) in few-shot use: model.yaml describes it as nearest
centroid (ProtoNet's scoring at scale 1), so fsl-predict classifies any number of classes by
the nearest class mean, equal to `fsl-evaluate --method centroid` on the same episodes; the
default evaluation is that method; `model.init_from` still copies exactly its body; and a
pre-trained model.yaml written before this description reads as one written now. Models are
freshly initialised exports written by fsl-pretrain's export code (tests/test_pretrain.py runs
the command itself)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fsl_dist.backbone import start_from
from fsl_dist.cli import evaluate as evaluate_cli
from fsl_dist.cli import predict as predict_cli
from fsl_dist.config import load_config
from fsl_dist.data.shards import load_manifest
from fsl_dist.finetune import centroid_accuracy, centroid_predictions, episode_features
from fsl_dist.predict import load_model
from fsl_dist.trained import build_run_model, describe, model_inputs, read_trained

from predicting import ROOT, episodes, export_pretrained, write_episode

N_WAY, K_SHOT, Q_QUERY, EPISODES = 5, 1, 3, 4
TINY = ("model.width=8", "data.split=futurama", f"task.k_shot={K_SHOT}",
        f"task.q_query={Q_QUERY}", f"eval.episodes={EPISODES}", f"eval.batch_size={EPISODES}",
        "logging.wandb=false", "train.tune_cpu_malloc=false")  # this process's allocator as is


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


@pytest.fixture(scope="module")
def tasks(shards):
    """The test episodes fsl-evaluate meets (eval.seed's first ones)."""
    cfg = load_config(ROOT / "configs" / "pretrain" / "omniglot_cnn.yaml", list(TINY))
    return episodes(shards, N_WAY, K_SHOT, Q_QUERY, seed=cfg.eval.seed, count=EPISODES)


def written_before(folder: Path, into: Path) -> Path:
    """A copy of the run ``folder`` whose model.yaml is what fsl-pretrain wrote before it
    described its model as nearest centroid: the pre-training config's own description (the
    MAML family, evaluation's inner steps) with the head's classes as model.n_way."""
    shutil.copytree(folder, into)
    cfg = load_config(into / "config.yaml")
    now = yaml.safe_load((into / "model.yaml").read_text())
    old = describe(cfg, load_manifest(cfg.data.shards), now["step"])
    old["model"]["n_way"] = now["pretrained"]["classes"]
    (into / "model.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    return into


@pytest.fixture(scope="module", params=["written-now", "written-before"])
def pretrained(request, shards, tmp_path_factory) -> Path:
    folder = export_pretrained(tmp_path_factory.mktemp("pretrained") / "run", shards, *TINY)
    if request.param == "written-before":
        folder = written_before(folder, folder.parent / "old")
    return folder


def test_model_yaml_describes_nearest_centroid_and_the_head_it_holds(shards, tmp_path):
    folder = export_pretrained(tmp_path / "run", shards, *TINY)
    description = yaml.safe_load((folder / "model.yaml").read_text())
    classes = 4 * load_manifest(shards)["splits"]["train"]["classes"]  # each turn a class
    assert description["algorithm"]["name"] == "protonet"
    assert description["protonet"] == {"scale": 1.0, "learn_scale": False}
    assert description["pretrained"] == {"classes": classes, "method": "centroid"}
    assert description["model"]["n_way"] == classes
    assert description["evaluation"] == {"inner_steps": 0, "precision": "no"}
    # an older file reads as this one: the same description, the same learner
    old = read_trained(written_before(folder, tmp_path / "old"), "cpu")
    assert old.description == read_trained(folder, "cpu").description
    assert type(old.learner).__name__ == "ProtoNet" and old.learner.scale_value() == 1.0


def test_prediction_is_the_nearest_centroid_of_centroid_evaluation(pretrained, tasks):
    model = load_model(pretrained, "cpu")
    assert model.n_way is None and model.learner.evaluation_steps == 0  # any N, no inner loop
    evaluated = centroid_accuracy(model.model, tasks)  # fsl-evaluate --method centroid's
    assert torch.equal(model.learner.evaluate_tasks(tasks, precision="no")["acc_after_per_task"],
                       evaluated)
    support, query = episode_features(model.model, tasks)
    for i in range(EPISODES):
        labels = tasks["support_y"][i]
        prediction = model.adapt(tasks["support_x"][i], labels).predict(tasks["query_x"][i])
        nearest = centroid_predictions(support[i:i + 1], labels[None], query[i:i + 1], N_WAY)
        assert torch.equal(prediction.indices, nearest[0]), i
        hits = (prediction.indices == tasks["query_y"][i]).float().mean()
        assert hits.item() == evaluated[i].item(), i
        # written out: the nearest class mean; probabilities, softmax of minus the distances
        means = torch.stack([support[i][labels == c].mean(0) for c in range(N_WAY)])
        distances = torch.cdist(query[i].double(), means.double()) ** 2
        assert torch.equal(prediction.indices, distances.argmin(-1)), i
        torch.testing.assert_close(prediction.probabilities.double(),
                                   torch.softmax(-distances, -1), rtol=1e-4, atol=1e-6)


def test_the_command_classifies_a_five_class_support_folder(pretrained, tasks, tmp_path, capsys):
    """The reported case: a 5-class support folder for a model whose head has hundreds of
    classes (before: "the model is 104-way: give exactly 104 classes")."""
    evaluated = centroid_accuracy(load_model(pretrained, "cpu").model, tasks)
    support, query = write_episode(tmp_path / "episode", tasks, 2, inverted=True)
    out = tmp_path / "p.json"
    assert predict_cli.main(["--model", str(pretrained), "--support", str(support), "--query",
                             str(query), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["accuracy"] == pytest.approx(100 * evaluated[2].item())
    assert (result["algorithm"], result["inner_steps"]) == ("protonet", 0)
    err = capsys.readouterr().err
    classes = read_trained(pretrained, "cpu").description["pretrained"]["classes"]
    assert (f"note: a pre-trained backbone (its head over {classes} training classes unused): "
            "each image goes to the nearest class mean of the support features") in err
    assert "error" not in err


def test_the_default_evaluation_is_the_centroid_method(pretrained):
    """fsl-evaluate without --method evaluates a pre-trained run as fsl-pretrain validated it
    (before: refused, pointing at --method)."""
    assert evaluate_cli.main(["--run-dir", str(pretrained), "--quiet"]) == 0
    assert evaluate_cli.main(["--run-dir", str(pretrained), "--quiet", "--method", "centroid",
                              "--out", "centroid.json"]) == 0
    default = json.loads((pretrained / "eval-test-centroid.json").read_text())
    centroid = json.loads((pretrained / "centroid.json").read_text())
    assert default["method"] == "centroid" and default["episodes"] == EPISODES
    assert (default["mean"], default["std"]) == (centroid["mean"], centroid["std"])


def test_init_from_copies_exactly_the_pre_trained_body(pretrained, shards):
    cfg = load_config(ROOT / "configs" / "cnn_maml.yaml",
                      [f"data.shards={shards}", "model.width=8"])
    model = build_run_model(cfg, model_inputs(load_manifest(shards)))
    copied = start_from(model, str(pretrained))
    exported = load_file(str(pretrained / "model.safetensors"))
    assert copied == sorted(k for k in exported if k.startswith("features."))
    state = model.state_dict()
    for name in copied:
        assert torch.equal(state[name], exported[name]), name
    assert model.classifier.weight.shape[0] == 5  # the task's head, fresh
