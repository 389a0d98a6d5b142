"""The mini-ImageNet configs load, hold their papers' settings (Conv-4 MAML: the MAML paper's;
the BOIL and ResNet-12 systems: BOIL's official code), and build their models."""

from pathlib import Path

import pytest

from fsl_dist.config import load_config
from fsl_dist.trained import build_run_model

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
    assert cfg.algorithm.first_order is False
    assert cfg.train.steps == 60000


# (inner steps, inner step size, test inner steps, meta step size, meta-batch 1-shot / 5-shot)
MAML_PAPER = (5, 0.01, 10, 0.001, {1: 4, 5: 2})
BOIL_CODE_CONV4 = (1, 0.5, 1, 0.001, {1: 4, 5: 4})
BOIL_CODE_RESNET12 = (1, 0.3, 1, 0.0006, {1: 4, 5: 4})
SETTINGS = {("cnn", "maml"): MAML_PAPER, ("cnn", "boil"): BOIL_CODE_CONV4,
            ("resnet", "maml"): BOIL_CODE_RESNET12, ("resnet", "boil"): BOIL_CODE_RESNET12}


@pytest.mark.parametrize("path", SYSTEMS, ids=lambda p: p.stem)
def test_each_system_is_what_its_name_says_and_builds_at_84x84_rgb(path):
    model_name, algorithm, setting = path.stem.split("_")
    cfg = load_config(path)
    shots = int(setting[len("5w"):-len("s")])
    assert cfg.algorithm.name == algorithm and cfg.task.k_shot == shots
    steps, step_size, test_steps, meta_lr, meta_batch = SETTINGS[model_name, algorithm]
    algo = cfg.algorithm
    assert (algo.inner_steps, algo.inner_lr, cfg.eval.inner_steps) == (steps, step_size, test_steps)
    assert cfg.optim.lr == meta_lr and cfg.train.meta_batch_size == meta_batch[shots]
    width = {"maml": 32, "boil": 64}[algorithm]  # MAML's Conv-4 has 32 filters, BOIL's 64
    expected = {"cnn": ("cnn", width, width * 5 * 5), "resnet": ("resnet12", 64, 640)}[model_name]
    model = build_run_model(cfg, {"in_channels": 3, "image_size": 84})
    assert (cfg.model.name, cfg.model.width, model.classifier.in_features) == expected
