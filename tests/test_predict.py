"""Prediction (fsl_dist.predict, fsl-predict): adapting through the API scores exactly as
evaluation does; images from files get the model's preprocessing; bad inputs are one clear
error with nothing written. Models here are freshly initialised exports (the export code of
training); tests/test_predict_trained.py checks trained runs through the real commands."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fsl_dist.cli import predict as cli
from fsl_dist.data.folder import load_image
from fsl_dist.data.preprocess import image_pixels, preprocessing_of
from fsl_dist.predict import PredictError, load_model

from predicting import class_name, episodes, export, write_episode

N_WAY, K_SHOT, Q_QUERY = 5, 1, 3


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


@pytest.fixture(scope="module")
def tasks(shards):
    return episodes(shards, N_WAY, K_SHOT, Q_QUERY, seed=7, count=6)


OPTIONS = {
    "maml": ["algorithm.name=maml"],
    "boil": ["algorithm.name=boil"],
    "anil": ["algorithm.name=anil"],
    "maml-learned-lr": ["algorithm.name=maml", "algorithm.learn_inner_lr=true"],
    # iMAML: prediction adapts with the proximal term, as evaluation does
    "maml-implicit": ["algorithm.meta_gradient=implicit", "algorithm.proximal_lambda=3.0"],
    "protonet": ["algorithm.name=protonet"],
    "protonet-learned-scale": ["algorithm.name=protonet", "protonet.learn_scale=true",
                               "protonet.scale=0.5"],
    "ridge": ["algorithm.name=ridge", "ridge.learn_lambda=true"],
    # Proto-MAML: the head starts from the support set's prototypes, then the inner loop
    "maml-proto": ["algorithm.name=maml", "algorithm.proto_head=true"],
}


@pytest.mark.parametrize("variant", sorted(OPTIONS))
def test_api_reproduces_evaluate_tasks_per_episode(variant, shards, tasks, tmp_path):
    folder = export(tmp_path / variant, shards, "model.width=8", f"task.n_way={N_WAY}",
                    "eval.inner_steps=2", *OPTIONS[variant])
    model = load_model(folder, "cpu")
    family = variant.split("-")[0]
    assert model.description["algorithm"]["name"] == family
    assert model.learner.evaluation_steps == (0 if family in ("protonet", "ridge") else 2)
    if variant.endswith("implicit"):
        spec = model.learner.spec(precision="no", evaluation=True)
        assert (spec.meta_gradient, spec.proximal_lambda) == ("implicit", 3.0)
    if variant.endswith("scale"):  # the learned scale, loaded (export() moved it off 0.5)
        assert model.learner.scale_value().item() != pytest.approx(0.5)
    expected = model.learner.evaluate_tasks(tasks, precision="no")["acc_after_per_task"]
    for i in range(len(expected)):
        classifier = model.adapt(tasks["support_x"][i], tasks["support_y"][i])
        prediction = classifier.predict(tasks["query_x"][i])
        got = (prediction.indices == tasks["query_y"][i]).float().mean()
        assert got.item() == expected[i].item(), i
        assert prediction.probabilities.shape == (N_WAY * Q_QUERY, N_WAY)
        assert torch.allclose(prediction.probabilities.sum(-1), torch.ones(N_WAY * Q_QUERY))


def test_files_get_the_omniglot_preprocessing(shards, tasks, tmp_path):
    folder = export(tmp_path / "model", shards, "model.width=8")
    description = yaml.safe_load((folder / "model.yaml").read_text())
    assert description["preprocessing"]["policy"] == "omniglot"
    assert description["preprocessing"]["invert"] is True
    assert description["evaluation"] == {"inner_steps": 3, "precision": None,
                                         "test_shift": 0}
    model = load_model(folder, "cpu")
    support, _ = write_episode(tmp_path / "episode", tasks, 0, inverted=True)
    files = sorted(support.rglob("*.png"))
    from_files = model.images(files)
    # the episode's images in the files' order (class folders, then index)
    order = sorted(range(N_WAY * K_SHOT),
                   key=lambda i: (class_name(int(tasks["support_y"][0][i])), i))
    assert torch.equal(from_files, tasks["support_x"][0][order])
    # a drawing at the source's 105x105 goes through the packer's inversion and resize
    drawing = Image.fromarray(np.full((105, 105), 255, np.uint8))
    assert model.images(drawing).abs().max() == 0  # white paper -> dark background


def test_files_get_the_folder_preprocessing(shards, tmp_path):
    rng = np.random.default_rng(0)
    colour, gray = tmp_path / "wide.jpg", tmp_path / "tall.png"
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), np.uint8)).save(colour)
    Image.fromarray(rng.integers(0, 255, (50, 30), np.uint8)).save(gray)
    record = preprocessing_of({"dataset": "cub", "channels": 3, "image_size": 16})
    assert record["policy"] == "folder" and record["invert"] is False
    with Image.open(colour) as opened:  # the folder packer's own reader gives the same pixels
        assert np.array_equal(image_pixels(opened, record), load_image(colour, 16, 3))

    # an export of a grayscale folder model, from before model.yaml recorded preprocessing:
    # derived from its data facts
    folder = export(tmp_path / "model", shards, "model.width=8")
    description = yaml.safe_load((folder / "model.yaml").read_text())
    description["data"]["dataset"] = "folder"
    del description["preprocessing"]
    (folder / "model.yaml").write_text(yaml.safe_dump(description))
    model = load_model(folder, "cpu")
    assert model.preprocessing["policy"] == "folder"
    expected = torch.tensor(load_image(gray, 28, 1)).float().mul_(1 / 255)
    assert torch.equal(model.images(gray)[0], expected)


def folders_args(tmp_path, model, support, query, *extra):
    return ["--model", str(model), "--support", str(support), "--query", str(query), *extra]


def test_command_writes_csv_and_json_with_true_classes(shards, tasks, tmp_path, capsys):
    folder = export(tmp_path / "model", shards, "model.width=8", "eval.inner_steps=2")
    support, query = write_episode(tmp_path / "episode", tasks, 1, inverted=True)
    assert cli.main(folders_args(tmp_path, folder, support, query, "--out",
                                 str(tmp_path / "p.json"))) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["classes"] == [class_name(i) for i in range(N_WAY)]
    assert len(result["predictions"]) == N_WAY * Q_QUERY
    row = result["predictions"][0]
    assert row["true"] == class_name(int(tasks["query_y"][1][0]))
    assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    hits = [r["predicted"] == r["true"] for r in result["predictions"]]
    assert result["accuracy"] == pytest.approx(100 * sum(hits) / len(hits))
    out = capsys.readouterr()
    assert "predicted" in out.out and "accuracy" in out.err

    assert cli.main(folders_args(tmp_path, folder, support, query, "--out",
                                 str(tmp_path / "p.csv"), "--quiet")) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].split(",") == ["file", "predicted", "true",
                                   *(f"p_{class_name(i)}" for i in range(N_WAY))]
    assert len(lines) == 1 + N_WAY * Q_QUERY
    assert capsys.readouterr().out == ""


def test_the_table_shows_paths_under_the_query_folder_true_classes_and_an_early_stop(
        shards, tasks, tmp_path, capsys):
    folder = export(tmp_path / "model", shards, "model.width=8", "train.steps=500")
    support, query = write_episode(tmp_path / "episode", tasks, 1, inverted=True)
    assert cli.main(folders_args(tmp_path, folder, support, query)) == 0
    out, err = capsys.readouterr()
    header, first = out.splitlines()[:2]
    assert header.split() == ["file", "predicted", "true", "probability"]
    name, _, true, _ = first.split()
    first_file = sorted(p for p in query.rglob("*.png"))[0]
    assert name == first_file.relative_to(query).as_posix()  # not only its base name
    assert true == first_file.parent.name
    assert "note: the model is of step 0 of 500 (its training stopped early)" in err

    description = yaml.safe_load((folder / "model.yaml").read_text())
    (folder / "model.yaml").write_text(yaml.safe_dump({**description, "step": 500}))
    assert cli.main(folders_args(tmp_path, folder, support, query, "--quiet")) == 0
    assert "note:" not in capsys.readouterr().err  # a finished model: no note


def bad_input(tmp_path, capsys, args, out):
    """The command fails with exit 2 and one error line, leaving ``out`` as it was."""
    out.write_text("earlier\n")
    assert cli.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert out.read_text() == "earlier\n"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)) == [
        out.name]  # no temporary file left
    return err


def test_bad_inputs_are_one_clear_error_and_nothing_is_written(shards, tasks, tmp_path, capsys):
    folder = export(tmp_path / "model", shards, "model.width=8")
    support, query = write_episode(tmp_path / "episode", tasks, 2, inverted=True)
    out = tmp_path / "out" / "p.csv"
    out.parent.mkdir()
    args = folders_args(tmp_path, folder, support, query)

    # a sixth class for a 5-way model
    extra = support / "class99"
    extra.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(extra / "a.png")
    err = bad_input(tmp_path, capsys, args, out)
    assert "6 classes" in err and "5-way" in err
    (extra / "a.png").unlink()

    # an empty class folder
    err = bad_input(tmp_path, capsys, args, out)
    assert str(extra) in err and "holds no images" in err
    extra.rmdir()

    # an unreadable image
    broken = query / class_name(0) / "broken.png"
    broken.write_bytes(b"not a png")
    err = bad_input(tmp_path, capsys, args, out)
    assert str(broken) in err and "cannot read image" in err
    broken.unlink()

    # a colour image for a grayscale model: refused, named; --convert converts it
    colour = query / class_name(0) / "colour.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(colour)
    err = bad_input(tmp_path, capsys, args, out)
    assert str(colour) in err and "3 channel(s)" in err and "takes 1" in err
    assert cli.main([*args, "--convert", "--quiet"]) == 0
    capsys.readouterr()

    # not a model folder; an output format that is neither CSV nor JSON
    err = bad_input(tmp_path, capsys, folders_args(tmp_path, tmp_path, support, query), out)
    assert "model.safetensors is missing" in err
    assert cli.main([*args, "--out", str(tmp_path / "p.txt")]) == 2
    assert "name a .csv or .json file" in capsys.readouterr().err
    assert not (tmp_path / "p.txt").exists()


def test_api_errors_name_the_numbers(shards, tasks, tmp_path):
    model = load_model(export(tmp_path / "model", shards, "model.width=8"), "cpu")
    with pytest.raises(PredictError, match=r"shape \(2, 3, 28, 28\).*\[B, 1, 28, 28\]"):
        model.images(torch.zeros(2, 3, 28, 28))
    with pytest.raises(PredictError, match="4 support images but 3 labels"):
        model.adapt(tasks["support_x"][0][:4], [0, 1, 2])
    with pytest.raises(PredictError, match="3 classes .* 5-way"):
        model.adapt(tasks["support_x"][0][:3], [0, 1, 2])
    classifier = model.adapt(tasks["support_x"][0], ["a", "b", "c", "d", "e"])
    assert set(classifier.predict(tasks["query_x"][0]).labels) <= {"a", "b", "c", "d", "e"}


def test_the_command_shows_progress_on_a_terminal_only(shards, tasks, tmp_path, monkeypatch,
                                                       capsys):
    from terminal import Terminal

    folder = export(tmp_path / "model", shards, "model.width=8")
    support, query = write_episode(tmp_path / "episode", tasks, 3, inverted=True)
    args = folders_args(tmp_path, folder, support, query)
    assert cli.main(args) == 0  # stderr captured by pytest: not a terminal
    assert "reading images" not in capsys.readouterr().err
    terminal = Terminal()
    try:
        monkeypatch.setattr(sys, "stderr", terminal.stream)
        assert cli.main([*args, "--batch-size", "5"]) == 0
        shown = terminal.written()
        assert "reading images: 100%" in shown and f"{N_WAY * Q_QUERY}/{N_WAY * Q_QUERY}" in shown
        assert "predicting: 100%" in shown and "3/3" in shown
        assert cli.main([*args, "--quiet"]) == 0
        assert "reading images" not in terminal.written()
    finally:
        monkeypatch.undo()
        terminal.close()
