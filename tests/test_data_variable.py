"""The general shard format: C channels, a different number of images per class, old formats
refused. Shard sets here are written directly with `write_shard_set` from synthetic classes whose
pixels say which class and image they are (channel 0: class id, channel 1: image index)."""

import json

import numpy as np
import pytest
import torch

from fsl_dist.config import Config, ConfigError
from fsl_dist.data import episodes, shards
from fsl_dist.data.episodes import MemoryTasks, TaskSpec, rank_slice
from fsl_dist.runs import check_tasks_fit

from synthetic_shards import COUNTS, SIZE, labelled_images, write_set


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("variable") / "set")


def decode(batch_x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(class id, image index) of every image of a batch [T, M, 3, H, W]."""
    pixels = (batch_x[..., 0, 0] * 255).round().to(torch.int64).numpy()
    assert (pixels[..., 2] == 200).all()
    return pixels[..., 0], pixels[..., 1]


def test_manifest_records_the_format_channels_size_and_counts(shard_set):
    manifest = shards.verify_shards(shard_set)
    assert manifest["format"] == shards.FORMAT
    assert manifest["format_version"] == shards.FORMAT_VERSION
    assert manifest["channels"] == 3 and manifest["image_size"] == SIZE
    assert manifest["dataset"] == "synthetic" and manifest["split_source"] == {"kind": "test"}
    assert manifest["packer"]["packer_version"] == shards.PACKER_VERSION
    for part, counts in COUNTS.items():
        entry = manifest["splits"][part]
        assert entry["images_per_class"] == counts and entry["images"] == sum(counts)
        assert entry["classes"] == len(counts) == sum(s["classes"] for s in entry["shards"])


def test_pool_holds_every_class_with_its_own_count(shard_set):
    pool = shards.load_class_pool(shard_set, "train")
    assert pool.images.shape == (sum(COUNTS["train"]), 3, SIZE, SIZE)
    assert pool.counts.tolist() == COUNTS["train"]
    for c, meta in enumerate(pool.classes):
        np.testing.assert_array_equal(pool.class_images(c).numpy(),
                                      labelled_images(meta["id"], COUNTS["train"][c]))


def test_two_writes_are_byte_identical(shard_set, tmp_path):
    again = write_set(tmp_path / "again")
    for path in sorted(shard_set.iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("spec", [TaskSpec(3, 2, 3), TaskSpec(2, 1, 1), TaskSpec(5, 4, 6)],
                         ids=str)
def test_memory_tasks_draw_only_classes_with_k_plus_q_images(shard_set, spec):
    pool = shards.load_class_pool(shard_set, "train")
    tasks = MemoryTasks(pool, spec, seed=4)
    eligible = {meta["id"] for meta, n in zip(pool.classes, pool.counts)
                if n >= spec.images_per_class}
    drawn = set()
    for step in range(20):
        batch = tasks.batch(step, range(16))
        n, k, q = spec.n_way, spec.k_shot, spec.q_query
        assert batch["support_x"].shape == (16, n * k, 3, SIZE, SIZE)
        assert batch["query_x"].shape == (16, n * q, 3, SIZE, SIZE)
        support_class, support_image = decode(batch["support_x"])
        query_class, query_image = decode(batch["query_x"])
        classes = np.concatenate([support_class.reshape(16, n, k),
                                  query_class.reshape(16, n, q)], axis=2)
        images = np.concatenate([support_image.reshape(16, n, k),
                                 query_image.reshape(16, n, q)], axis=2)
        assert (classes == classes[:, :, :1]).all()  # one class per label group
        for t in range(16):
            ids = classes[t, :, 0]
            assert len(set(ids)) == n and set(ids) <= eligible
            for row, class_id in zip(images[t], ids):
                count = COUNTS["train"][class_id - 1]
                assert len(set(row)) == k + q and row.max() < count  # distinct, inside the class
        drawn |= set(classes[:, :, 0].ravel())
        labels = batch["support_y"].reshape(16, n, k)[:, :, 0]
        assert (np.sort(labels.numpy(), axis=1) == np.arange(n)).all()
    assert drawn == eligible  # and every class that qualifies is used


def test_rgb_tasks_are_the_same_for_any_world_size(shard_set):
    spec = TaskSpec(3, 2, 3)
    whole = MemoryTasks(shards.load_class_pool(shard_set, "train"), spec, seed=2).batch(5, range(8))
    for world in (2, 4):
        parts = [MemoryTasks(shards.load_class_pool(shard_set, "train"), spec, seed=2)
                 .batch(5, rank_slice(8, rank, world)) for rank in range(world)]
        for key in episodes.BATCH_KEYS:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), (key, world)


def test_stream_tasks_draw_only_classes_with_k_plus_q_images(shard_set):
    spec = TaskSpec(3, 2, 3)
    stream = episodes.make_tasks(shard_set, "train", spec, seed=0, mode="stream",
                                 tasks_per_batch=4, batches=10, rank=0, world=1, shuffle_buffer=4)
    eligible = {i + 1 for i, n in enumerate(COUNTS["train"]) if n >= 5}
    drawn = set()
    for batch in stream:
        assert batch["support_x"].shape == (4, 6, 3, SIZE, SIZE)
        classes, images = decode(torch.cat([batch["support_x"], batch["query_x"]], 1))
        drawn |= set(classes.ravel())
        for class_id, image in zip(classes.ravel(), images.ravel()):
            assert image < COUNTS["train"][class_id - 1]
    assert drawn == eligible


NOT_ENOUGH = (r"3-way tasks with k_shot \+ q_query = 6 images per class need 3 classes holding "
              r"at least 6 images, but only 2 of the 4 classes of part 'test' .* do")


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_too_few_classes_with_k_plus_q_images_is_refused(shard_set, mode):
    with pytest.raises(ValueError, match=NOT_ENOUGH):
        episodes.make_tasks(shard_set, "test", TaskSpec(3, 2, 4), seed=0, mode=mode,
                            tasks_per_batch=2, batches=1)


def test_the_config_check_names_the_part_and_the_counts(shard_set):
    cfg = Config()
    cfg.data.shards, cfg.task.n_way, cfg.task.k_shot, cfg.task.q_query = str(shard_set), 3, 1, 5
    with pytest.raises(ConfigError, match=r"= 6 images per class: only 2 of the 4 classes of the "
                                          r"test part of .* fewer than `task.n_way` = 3"):
        check_tasks_fit(cfg, shards.load_manifest(shard_set))


def old_manifest(shard_dir, **fields):
    shard_dir.mkdir()
    (shard_dir / shards.MANIFEST).write_text(json.dumps({"splits": {}, **fields}))
    return shard_dir


def test_omniglot_shards_of_the_old_format_are_refused_with_the_repack_command(tmp_path):
    old = old_manifest(tmp_path / "omniglot-futurama", format="fsl_dist/omniglot-shards",
                       dataset="omniglot", split="futurama")
    with pytest.raises(shards.ShardError) as caught:
        episodes.make_tasks(old, "train", TaskSpec(5, 1, 1), seed=0)
    message = str(caught.value)
    assert "\n" not in message and "old format fsl_dist/omniglot-shards" in message
    assert message.endswith(f"repack with `python launch/pack.py omniglot --source DIR --split "
                            f"futurama --out {old}`")


@pytest.mark.parametrize("version", [1, 3])
def test_another_version_of_the_format_is_refused(tmp_path, version):
    other = old_manifest(tmp_path / "set", format=shards.FORMAT, format_version=version,
                         dataset="folder")
    with pytest.raises(shards.ShardError, match=rf"version {version} .*repack with `python "
                                                rf"launch/pack.py folder ROOT --out {other}`"):
        shards.verify_shards(other)
