"""Typed config: YAML + inherit + dotted overrides; unknown keys, wrong types and impossible
values are errors that name the key."""

from pathlib import Path

import pytest
import yaml

from fsl_dist.config import Config, ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYSTEMS = ("cnn_maml", "cnn_boil", "resnet_maml", "resnet_boil")


@pytest.mark.parametrize("name", SYSTEMS)
def test_the_four_systems_load_and_differ_only_in_model_and_algorithm(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    model, algorithm = name.split("_")
    assert (cfg.name, cfg.model.name, cfg.algorithm.name) == (name, model, algorithm)
    assert cfg.data.split == "futurama" and (cfg.task.n_way, cfg.task.k_shot) == (5, 5)
    assert cfg.algorithm.first_order is False


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS / "cnn_maml.yaml",
                      ["train.steps=7", "optim.lr=1e-4", "algorithm.inner_lr.features=0.3",
                       "algorithm.inner_lr.classifier=0.5", "logging.tags=[a,b]", "precision=bf16"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-4 and cfg.precision == "bf16"
    assert cfg.algorithm.inner_lr == {"features": 0.3, "classifier": 0.5}
    assert cfg.logging.tags == ["a", "b"]


def test_an_int_is_accepted_where_a_float_is_expected():
    assert load_config(CONFIGS / "cnn_maml.yaml", ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, named", [
    ("train.stepz=3", "train.stepz"),
    ("trian.steps=3", "trian"),
    ("train.steps=many", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("algorithm.first_order=maybe", "algorithm.first_order"),
    ("model.name=vgg", "model.name"),
    ("algorithm.name=reptile", "algorithm.name"),
    ("data.split=random", "data.split"),
    ("precision=fp8", "precision"),
    ("task.n_way=0", "task.n_way"),
    ("train.meta_batch_size=-4", "train.meta_batch_size"),
    ("algorithm.inner_lr.head=0.1", "algorithm.inner_lr.head"),
    ("optim.grad_clip=0", "optim.grad_clip"),
    ("optim.schedule=linear", "optim.schedule"),
    ("optim.min_lr=0.01", "optim.min_lr"),
    ("no_equals_sign", "section.key=value"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        load_config(CONFIGS / "cnn_maml.yaml", [override])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"inherit": str(CONFIGS / "base.yaml"), "model": {"depth": 4}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.depth"):
        load_config(bad)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_reads_back_equal(tmp_path):
    cfg = load_config(CONFIGS / "resnet_boil.yaml", ["train.seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert isinstance(cfg, Config)
