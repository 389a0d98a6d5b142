"""The mini-ImageNet configs load, hold the MAML paper's settings, and build their models."""

from pathlib import Path

import pytest

from fsl_dist.config import load_config
from fsl_dist.runs import build_run_model

FOLDER = Path(__file__).resolve().parents[1] / "configs" / "miniimagenet"
CONFIGS = sorted(FOLDER.glob("*.yaml"))
SYSTEMS = [p for p in CONFIGS if p.name != "base.yaml"]


def test_the_four_systems_in_both_shot_settings_are_there():
    names = {p.stem for p in SYSTEMS}
    assert names == {f"{model}_{algo}_5w{shots}s" for model in ("cnn", "resnet")
                     for algo in ("maml", "boil") for shots in (1, 5)}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_with_the_shared_settings(path):
    cfg = load_config(path)
    assert cfg.data.shards == "shards/miniimagenet" and cfg.data.rotate is False
    assert (cfg.task.n_way, cfg.task.q_query) == (5, 15)
    algo = cfg.algorithm
    assert (algo.inner_steps, algo.inner_lr, cfg.eval.inner_steps) == (5, 0.01, 10)
    assert cfg.algorithm.first_order is False
    assert (cfg.train.steps, cfg.optim.lr) == (60000, 0.001)


@pytest.mark.parametrize("path", SYSTEMS, ids=lambda p: p.stem)
def test_each_system_is_what_its_name_says_and_builds_at_84x84_rgb(path):
    model_name, algorithm, setting = path.stem.split("_")
    cfg = load_config(path)
    shots = int(setting[len("5w"):-len("s")])
    assert cfg.algorithm.name == algorithm and cfg.task.k_shot == shots
    assert cfg.train.meta_batch_size == {1: 4, 5: 2}[shots]
    expected = {"cnn": ("cnn", 32, 32 * 5 * 5), "resnet": ("resnet12", 64, 640)}[model_name]
    model = build_run_model(cfg, {"in_channels": 3, "image_size": 84})
    assert (cfg.model.name, cfg.model.width, model.classifier.in_features) == expected
