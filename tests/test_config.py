"""Typed config: YAML + inherit + dotted overrides; unknown keys, wrong types and impossible
values are errors that name the key."""

from pathlib import Path

import pytest
import yaml

from fsl_dist.config import (
    Config,
    ConfigError,
    default_run_dir,
    find_config,
    load_config,
    save_config,
    to_dict,
)

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


# ---------------------------------------------------------------- configs by name


@pytest.mark.parametrize("given", ["cnn_maml", "cnn_maml.yaml", "configs/cnn_maml.yaml"])
def test_a_shipped_config_loads_by_name_from_any_folder_with_its_files_run_folder(
        given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name is looked up in the shipped tree
    by_name, by_file = load_config(given), load_config(CONFIGS / "cnn_maml.yaml")
    assert to_dict(by_name) == to_dict(by_file)
    assert default_run_dir(by_name) == Path("runs/cnn_maml-0")


def test_a_nested_name_follows_inherit_relative_to_its_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("miniimagenet/cnn_boil_5w1s")
    assert find_config("miniimagenet/cnn_boil_5w1s") == CONFIGS / "miniimagenet/cnn_boil_5w1s.yaml"
    assert cfg.name == "cnn_boil_5w1s" and cfg.data.dataset == "miniimagenet"


def test_a_file_that_exists_wins_over_the_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cnn_maml.yaml").write_text(
        f"inherit: {CONFIGS / 'cnn_maml.yaml'}\ntrain: {{steps: 7}}\n")
    assert load_config("cnn_maml.yaml").train.steps == 7
    assert load_config("cnn_maml").train.steps != 7  # no such file here: the shipped one


@pytest.mark.parametrize("given", ["cnn_mamll", "sweeps/four_systems", "../configs/cnn_maml"])
def test_an_unknown_name_is_a_config_error_listing_the_names(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"config {given} does not exist, and no config") as err:
        load_config(given)
    listed = str(err.value).partition("one of: ")[2]
    assert "cnn_maml, " in listed and "miniimagenet/{base, " in listed
    assert "sweeps" not in listed  # sweep files are not configs


SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "sweeps")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads_and_validates(path):
    """Every config a document names (configs/results/ included) loads with no override; the
    sweeps are checked by tests/test_sweep.py."""
    assert isinstance(load_config(path), Config)
