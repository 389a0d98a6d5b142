"""Training on RGB folder shards through `launch/train.py` and `launch/evaluate.py`: the model is
built for the manifest's channels and size, and two ranks give the parameters of one process."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from fsl_dist.data import folder

from launching import ROOT, run
from training_runs import max_abs_difference

SIZE = 16
TINY = ["model.width=8", "task.n_way=3", "task.k_shot=1", "task.q_query=2",
        "train.meta_batch_size=2", "train.steps=2", "train.checkpoint_every=2",
        "train.eval_every=2", "train.log_every=1", "eval.episodes=6", "eval.val_episodes=2",
        "eval.batch_size=6", "eval.inner_steps=1", "logging.wandb=false"]


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory):
    """rgb_shards(size) -> twelve RGB classes of 3 to 6 random JPEG/PNG images of odd sizes (one
    train class of 2, too small for the tasks), packed at size x size once per size."""
    base = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    names = [f"class{i:02d}" for i in range(12)]
    for i, name in enumerate(names):
        (base / "root" / name).mkdir(parents=True)
        for j in range(2 if i == 0 else 3 + i % 4):
            pixels = rng.integers(0, 256, (20 + j, 24 + i, 3), dtype=np.uint8)
            kind = "png" if (i + j) % 2 else "jpeg"
            Image.fromarray(pixels).save(base / "root" / name / f"{j}.{kind}")
    split = base / "split.json"
    split.write_text(json.dumps({"train": names[:6], "val": names[6:9], "test": names[9:]}))

    @functools.cache
    def packed(size: int):
        return folder.pack_folder(base / "root", base / f"shards{size}", size=size, channels=3,
                                  split_file=split, quiet=True)

    return packed


def train(run_dir, shards, processes: int):
    args = ["--config", str(ROOT / "configs" / "folder_example.yaml"), "--run-dir", str(run_dir),
            f"data.shards={shards}", *TINY]
    return run("train.py", args, processes=processes)


@pytest.fixture(scope="module")
def one_process_run(rgb_shards, tmp_path_factory):
    """one_process_run(size) -> the run folder of one process on the shards at size, trained
    once per size: the train-and-evaluate test and the equality test share it."""

    @functools.cache
    def trained(size: int):
        run_dir = tmp_path_factory.mktemp(f"one{size}") / "run"
        train(run_dir, rgb_shards(size), 1)
        return run_dir

    return trained


def test_rgb_folder_shards_train_and_evaluate(one_process_run):
    run_dir = one_process_run(SIZE)
    model = yaml.safe_load((run_dir / "model.yaml").read_text())
    assert model["model"]["in_channels"] == 3 and model["model"]["image_size"] == SIZE
    assert model["data"]["dataset"] == "folder" and model["data"]["channels"] == 3
    info = json.loads((run_dir / "run.json").read_text())
    assert info["data"]["channels"] == 3 and info["data"]["image_size"] == SIZE
    weights = load_file(str(run_dir / "model.safetensors"))
    assert weights["features.0.0.weight"].shape[1] == 3  # the first conv reads RGB
    assert json.loads((run_dir / "eval.json").read_text())["episodes"] == 6
    run("evaluate.py", ["--run-dir", str(run_dir), "--episodes", "6", "--part", "val"])
    evaluation = json.loads((run_dir / "eval-val.json").read_text())
    assert evaluation["episodes"] == 6 and 0 <= evaluation["mean"] <= 100


# 84x84 is the size of the RGB benchmarks (mini-ImageNet and tiered-ImageNet): larger feature
# maps, so longer reductions in batch norm and the convolutions, than the cheap 16x16 case.
@pytest.mark.parametrize("size", [SIZE, 84])
def test_two_ranks_give_the_parameters_of_one_process_on_rgb_tasks(rgb_shards, one_process_run,
                                                                   tmp_path, size):
    one = one_process_run(size)
    two = tmp_path / "two"
    train(two, rgb_shards(size), 2)
    for run_dir, world_size in ((one, 1), (two, 2)):
        info = json.loads((run_dir / "run.json").read_text())
        assert info["world_size"] == world_size and info["data"]["image_size"] == size
    one_weights = load_file(str(one / "model.safetensors"))
    assert max_abs_difference(one_weights, load_file(str(two / "model.safetensors"))) < 1e-6
