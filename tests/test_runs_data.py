"""The model takes its channels and image size from the shard set's manifest, never from the
config; the trainer's data checks (dataset, missing folder shards) fail before training."""

import pytest
import torch

from fsl_dist.config import Config, ConfigError
from fsl_dist.data import shards
from fsl_dist.data.episodes import TaskSpec, make_tasks
from fsl_dist.meta import InnerLoopSpec, evaluate_tasks
from fsl_dist.runs import ensure_shards
from fsl_dist.trained import check_shards, model_inputs
from fsl_dist.trainer import build_state

from synthetic_shards import SIZE, write_set


class OneProcess:
    is_main = True

    def __init__(self):
        self.printed = []

    def print(self, *args, **kwargs):
        self.printed.append(" ".join(map(str, args)))

    def broadcast_object(self, value):
        return value


@pytest.fixture(scope="module")
def rgb_set(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("rgb") / "set")


def small_config(shard_set, name="cnn") -> Config:
    cfg = Config()
    cfg.data.shards, cfg.data.dataset, cfg.data.rotate = str(shard_set), "folder", False
    cfg.model.name, cfg.model.width = name, 4
    cfg.task.n_way, cfg.task.k_shot, cfg.task.q_query = 3, 1, 2
    return cfg


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_the_model_is_built_for_the_manifests_channels_and_size(rgb_set, name):
    cfg = small_config(rgb_set, name)
    inputs = model_inputs(shards.load_manifest(rgb_set))
    assert inputs == {"in_channels": 3, "image_size": SIZE}
    cfg.data.image_size = 28  # an Omniglot packing option: the model must not read it
    model = build_state(cfg, torch.device("cpu"), inputs).model
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 3
    tasks = make_tasks(rgb_set, "train", TaskSpec(3, 1, 2), seed=0).batch(0, range(2))
    spec = InnerLoopSpec.from_config(cfg, precision="no", inner_lr=0.1)
    stats = evaluate_tasks(model, tasks, spec)
    assert stats["acc_after_per_task"].shape == (2,)


def test_a_model_yaml_that_disagrees_with_the_shards_is_refused(rgb_set, tmp_path):
    cfg = small_config(rgb_set)
    described = {"model": {"name": "cnn", "in_channels": 3, "image_size": 84}}
    with pytest.raises(ConfigError, match=rf"image_size 84 \(trained\) vs {SIZE} \(shards\)"):
        check_shards(described, cfg, tmp_path)
    check_shards({"model": {"name": "cnn", "in_channels": 3, "image_size": SIZE}}, cfg, tmp_path)


def test_ensure_shards_returns_the_manifest_and_checks_the_dataset(tmp_path):
    folder_set = write_set(tmp_path / "set", dataset="folder")
    cfg = small_config(folder_set)
    assert ensure_shards(cfg, OneProcess())["channels"] == 3
    cfg.data.dataset = "omniglot"
    with pytest.raises(ConfigError, match=r"`data.dataset` = 'omniglot' but .* holds 'folder' "
                                          r"shards; set data.dataset=folder"):
        ensure_shards(cfg, OneProcess())


def test_rotating_natural_images_warns(tmp_path):
    folder_set = write_set(tmp_path / "set", dataset="folder")
    cfg = small_config(folder_set)
    cfg.data.rotate = True
    dist = OneProcess()
    ensure_shards(cfg, dist)
    assert "set data.rotate=false" in dist.printed[0]


def test_missing_folder_shards_say_how_to_pack_them_and_pack_nothing(tmp_path):
    cfg = small_config(tmp_path / "my-folder")
    with pytest.raises(shards.ShardError, match=r"python launch/pack.py folder ROOT --out "):
        ensure_shards(cfg, OneProcess())
    assert not (tmp_path / "my-folder").exists()
