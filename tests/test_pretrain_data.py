"""Pre-training's batches (fsl_dist/pretrain.py): a pure function of (seed, step), shared
among processes in contiguous whole groups, every (image, quarter turn) once per epoch, and a
turned image labelled as a class of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fsl_dist.config import ConfigError
from fsl_dist.data.episodes import to_unit_float
from fsl_dist.data.shards import ClassPool
from fsl_dist.pretrain import ImageBatches, share_of


def pool(classes: int = 3, per_class: int = 4) -> ClassPool:
    counts = np.full(classes, per_class, dtype=np.int64)
    images = torch.arange(classes * per_class * 4, dtype=torch.uint8).view(-1, 1, 2, 2)
    return ClassPool(images, counts, [{"id": i} for i in range(classes)], "train", Path("s"))


def test_two_ranks_shares_make_the_one_process_batch():
    batches = ImageBatches(pool(), batch_size=8, seed=3, rotate=False)
    whole_x, whole_y = batches.batch(5, range(0, 8))
    parts = [batches.batch(5, share_of(8, 2, rank, 2)) for rank in range(2)]
    assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
    assert torch.equal(torch.cat([y for _, y in parts]), whole_y)
    again = ImageBatches(pool(), batch_size=8, seed=3, rotate=False).batch(5, range(0, 8))
    assert torch.equal(again[0], whole_x)  # a fresh sampler (a resumed run) meets the same batch


def test_an_epoch_takes_every_image_and_turn_once():
    batches = ImageBatches(pool(), batch_size=6, seed=0, rotate=True)
    assert batches.classes == 12 and batches.steps_per_epoch == 8  # 48 (image, turn) pairs
    seen = np.concatenate([batches.step_items(s) for s in range(8)])
    assert sorted(seen) == list(range(48))
    assert not np.array_equal(batches.step_items(8), batches.step_items(0))  # a new order


def test_a_turned_image_is_its_class_in_another_label():
    source = pool()
    batches = ImageBatches(source, batch_size=48, seed=0, rotate=True)
    x, y = batches.batch(0, range(48))
    for item, image, label in zip(batches.step_items(0), x, y):
        original, turns = item % 12, item // 12
        assert label == original // 4 + 3 * turns  # classes of 4 images; 3 classes per turn
        expected = to_unit_float(torch.rot90(source.images[original], int(turns), dims=(-2, -1)))
        assert torch.equal(image, expected)


def test_groups_that_processes_cannot_share_are_refused():
    with pytest.raises(ConfigError, match=r"gives 3 groups, which 2 processes cannot share "
                       r"equally; set pretrain.norm_group to a divisor of 6"):
        share_of(12, 4, 0, 2)


def test_the_augmentation_hook_gets_the_images_step_and_items():
    calls = []

    def augment(x, step, items):
        calls.append((step, items.tolist()))
        return 1 - x

    batches = ImageBatches(pool(), batch_size=4, seed=1, rotate=False, augment=augment)
    plain = ImageBatches(pool(), batch_size=4, seed=1, rotate=False)
    x, _ = batches.batch(2, range(1, 3))
    assert torch.equal(x, 1 - plain.batch(2, range(1, 3))[0])
    assert calls == [(2, batches.step_items(2)[1:3].tolist())]


def test_augmented_batches_are_the_same_however_the_processes_share_them():
    """data.augment in pre-training: each image's crop, jitter and flip come from (seed, step,
    its position in the epoch), so two ranks' shares make the one-process batch, a resumed
    sampler meets the same images, and the images really change."""
    from fsl_dist.data.augment import Augment
    from fsl_dist.pretrain import augment_by_position

    pixels = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    images = ClassPool(pixels, np.full(4, 4, dtype=np.int64), [{"id": i} for i in range(4)],
                       "train", Path("s"))
    hook = augment_by_position(Augment("lee2019", padding=2), seed=3)
    batches = ImageBatches(images, batch_size=8, seed=3, rotate=False, augment=hook)
    whole, _ = batches.batch(5, range(0, 8))
    parts = [batches.batch(5, share_of(8, 2, rank, 2))[0] for rank in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    again = ImageBatches(images, batch_size=8, seed=3, rotate=False, augment=hook)
    assert torch.equal(again.batch(5, range(0, 8))[0], whole)
    plain = ImageBatches(images, batch_size=8, seed=3, rotate=False).batch(5, range(0, 8))[0]
    assert all(not torch.equal(a, b) for a, b in zip(whole, plain))
    assert augment_by_position(None, seed=3) is None
