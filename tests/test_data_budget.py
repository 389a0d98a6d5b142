"""Memory mode's budget: a class pool larger than `data.memory_budget_gb` is refused before
loading, by the run's data checks and by `make_tasks`, with the sizes and `data.mode=stream`;
stream mode is not held to it for the train part."""

import dataclasses

import pytest

from fsl_dist.config import Config, ConfigError
from fsl_dist.data import shards
from fsl_dist.data.episodes import MemoryTasks, StreamTasks, TaskSpec, make_tasks
from fsl_dist.runs import check_memory_budget

from synthetic_shards import COUNTS, SIZE, write_set

IMAGE_BYTES = 3 * SIZE * SIZE
SPEC = TaskSpec(2, 1, 2, rotate=False)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("budget") / "set")


def budget_config(shard_set, budget_gb: float, mode: str = "memory") -> Config:
    cfg = Config()
    cfg.data = dataclasses.replace(cfg.data, shards=str(shard_set), memory_budget_gb=budget_gb,
                                   mode=mode)
    return cfg


def test_part_bytes_are_images_times_channels_and_side_squared(shard_set):
    manifest = shards.load_manifest(shard_set)
    for part, counts in COUNTS.items():
        assert shards.part_bytes(manifest, part) == sum(counts) * IMAGE_BYTES


def test_make_tasks_refuses_a_train_pool_above_the_budget_before_loading(shard_set, monkeypatch):
    train_bytes = sum(COUNTS["train"]) * IMAGE_BYTES
    monkeypatch.setattr(shards, "load_class_pool", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError) as refused:
        make_tasks(shard_set, "train", SPEC, seed=0, memory_budget_gb=train_bytes / 2e9)
    message = str(refused.value)
    assert "data.mode=stream" in message and "\n" not in message
    assert f"train {train_bytes / 1e9:.3g} GB" in message
    assert f"data.memory_budget_gb = {train_bytes / 2e9:g}" in message


def test_make_tasks_loads_a_pool_within_the_budget_and_streams_any(shard_set):
    train_bytes = sum(COUNTS["train"]) * IMAGE_BYTES
    assert isinstance(make_tasks(shard_set, "train", SPEC, seed=0,
                                 memory_budget_gb=train_bytes / 1e9), MemoryTasks)
    stream = make_tasks(shard_set, "train", SPEC, seed=0, mode="stream", tasks_per_batch=1,
                        batches=1, memory_budget_gb=1e-9)
    assert isinstance(stream, StreamTasks)


def test_the_run_check_sums_the_parts_each_process_loads(shard_set):
    manifest = shards.load_manifest(shard_set)
    loaded = sum(sum(counts) for counts in COUNTS.values()) * IMAGE_BYTES
    check_memory_budget(budget_config(shard_set, loaded / 1e9), manifest)
    with pytest.raises(ConfigError, match="memory mode would load .* set data.mode=stream"):
        check_memory_budget(budget_config(shard_set, (loaded - 1) / 1e9), manifest)


def test_stream_mode_is_held_to_the_budget_only_for_the_held_out_parts(shard_set):
    manifest = shards.load_manifest(shard_set)
    held_out = (sum(COUNTS["val"]) + sum(COUNTS["test"])) * IMAGE_BYTES
    check_memory_budget(budget_config(shard_set, held_out / 1e9, "stream"), manifest)
    with pytest.raises(ConfigError) as refused:
        check_memory_budget(budget_config(shard_set, (held_out - 1) / 1e9, "stream"), manifest)
    assert "held-out parts always load" in str(refused.value)
    assert "data.mode=stream" not in str(refused.value)


def test_the_default_budget_is_eight_gb():
    assert Config().data.memory_budget_gb == 8.0
