"""Augmentation of natural images: each transform does what torchvision's does (against
per-image references written the obvious way), parameters depend only on their key, training
tasks are augmented the same for any process count, held-out tasks never."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsl_dist import config as cfglib
from fsl_dist.data import augment as aug
from fsl_dist.data import episodes, shards
from fsl_dist.data.augment import Augment, generator
from fsl_dist.data.episodes import MemoryTasks, TaskSpec, rank_slice
from fsl_dist.runs import episode_shape
from fsl_dist.trainer import task_spec

SIZE = 12


def photos(count: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0.15, 0.85]: far from the clamps unless a factor pushes them."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((count, channels, 4, 4))).float()
    return 0.15 + 0.7 * F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")


def fixed(count: int, *, offset=(8, 8), factor=(1.0, 1.0, 1.0), order=(0, 1, 2), flip=False):
    return {"offset": torch.tensor([offset] * count), "factor": torch.tensor([factor] * count),
            "order": torch.tensor([order] * count), "flip": torch.tensor([flip] * count)}


# ---------------------------------------------------------------- each transform


def test_a_flip_mirrors_the_columns_and_nothing_else():
    images = photos(4)
    flipped = Augment().apply(images, fixed(4, flip=True))
    assert torch.equal(flipped, images.flip(-1))
    assert torch.equal(Augment().apply(images, fixed(4)), images)  # centred, factors 1: identity


def test_a_crop_with_padding_shifts_the_content_and_fills_black():
    """Window corner (0, 16) of the 8-padded image: content moves 8 down and 8 left."""
    images = photos(2)
    out = Augment().apply(images, fixed(2, offset=(0, 16)))
    assert torch.equal(out[..., 8:, :SIZE - 8], images[..., :SIZE - 8, 8:])
    assert not out[..., :8, :].any() and not out[..., :, SIZE - 8:].any()


def reference_crop(image: torch.Tensor, offset, padding: int) -> torch.Tensor:
    top, left = (int(v) for v in offset)
    return F.pad(image, (padding,) * 4)[:, top:top + SIZE, left:left + SIZE]


def test_batched_crops_equal_one_image_at_a_time_for_every_offset():
    images = photos(17 * 17)
    offsets = torch.cartesian_prod(torch.arange(17), torch.arange(17))
    out = aug.shift_crop(images, offsets, 8)
    for image, offset, got in zip(images, offsets, out):
        assert torch.equal(got, reference_crop(image, offset, 8))


def grey(image: torch.Tensor) -> torch.Tensor:
    return (0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


def reference_jitter(image, factors, order):
    """torchvision's adjust_brightness / adjust_contrast / adjust_saturation on a float image."""
    for op in order:
        f = float(factors[op])
        toward = [torch.zeros_like(image), grey(image).mean(), grey(image)][op]
        image = (f * image + (1 - f) * toward).clamp(0, 1)
    return image


def test_jitter_equals_torchvisions_formulas_in_the_drawn_order():
    images = photos(64, seed=1)
    params = Augment().sample(64, (SIZE, SIZE), generator(3))
    params["offset"][:] = 8  # no shift: the jitter alone, then the drawn flips
    out = Augment().apply(images, params)
    for i, got in enumerate(out):
        want = reference_jitter(images[i], params["factor"][i], params["order"][i].tolist())
        want = want.flip(-1) if params["flip"][i] else want
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_each_jitter_moves_its_statistic_by_its_factor():
    """Brightness scales the mean, contrast the spread around the grey mean (keeping that
    mean), saturation the colour around the grey image (keeping the grey image)."""
    images = photos(3, seed=2)
    g = torch.stack([grey(i) for i in images])
    bright = Augment().apply(images, fixed(3, factor=(1.15, 1, 1)))  # 0.85 x 1.15 < 1
    torch.testing.assert_close(bright, images * 1.15)
    contrast = Augment().apply(images, fixed(3, factor=(1, 0.6, 1), order=(1, 0, 2)))
    mean = g.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(contrast - mean, 0.6 * (images - mean))
    # towards grey stays inside [0, 1] (no clamp); the grey weights sum to 0.9999, not 1
    saturated = Augment().apply(images, fixed(3, factor=(1, 1, 0.6), order=(2, 0, 1)))
    torch.testing.assert_close(torch.stack([grey(i) for i in saturated]), g, atol=1e-4, rtol=0)
    torch.testing.assert_close(saturated - g, 0.6 * (images - g))


def test_drawn_parameters_stay_within_their_ranges():
    params = Augment(jitter=(0.4, 0.2, 0.0)).sample(4000, (84, 84), generator(0))
    assert params["offset"].min() == 0 and params["offset"].max() == 16
    low, high = params["factor"].min(0).values, params["factor"].max(0).values
    assert (low >= torch.tensor([0.6, 0.8, 1.0])).all()
    assert (high <= torch.tensor([1.4, 1.2, 1.0])).all() and high[0] > 1.39 and low[0] < 0.61
    assert (params["order"].sort(1).values == torch.arange(3)).all()
    assert len({tuple(o) for o in params["order"].tolist()}) == 6
    assert 0.45 < params["flip"].float().mean() < 0.55
    assert not Augment(flip=False).sample(100, (84, 84), generator(0))["flip"].any()


def test_jittered_images_keep_their_mean_within_the_factors_bounds():
    """Unclamped: brightness scales the mean by [0.6, 1.4], contrast and saturation keep the
    grey mean (up to the grey weights' sum, 0.9999); so a jittered image's grey mean is its own
    times its brightness factor, within 0.6..1.4."""
    images = photos(500, seed=3) * 0.3 + 0.3  # in [0.35, 0.55]: no factor reaches a clamp
    params = Augment(padding=0).sample(500, (SIZE, SIZE), generator(4))
    out = Augment(padding=0).apply(images, params)
    assert 0 < out.min() and out.max() < 1
    ratio = (torch.stack([grey(i).mean() for i in out])
             / torch.stack([grey(i).mean() for i in images]))
    torch.testing.assert_close(ratio, params["factor"][:, 0], atol=0, rtol=1e-4)
    assert 0.6 <= ratio.min() < 0.65 and 1.35 < ratio.max() <= 1.4 * (1 + 1e-4)


def test_one_channel_images_ignore_saturation():
    images = photos(5, channels=1)
    out = Augment().apply(images, fixed(5, factor=(1, 1, 0.6)))
    assert torch.equal(out, images)


def test_uint8_images_come_back_as_the_floats_of_the_same_augmentation():
    images = (photos(8) * 255).round().to(torch.uint8)
    params = Augment().sample(8, (SIZE, SIZE), generator(5))
    torch.testing.assert_close(Augment().apply(images, params),
                               Augment().apply(images.float() / 255, params), atol=1e-6, rtol=0)


def test_resized_crop_of_the_whole_image_is_the_image_and_of_a_half_a_stretch():
    """A ramp (pixel value = its column) shows the sampling: the left half stretched to the
    full width reads column (u + 0.5) / 2 - 0.5 at output column u (half-pixel centres),
    clamped to the half's own first and last columns."""
    ramp = torch.arange(SIZE, dtype=torch.float32).expand(1, 1, SIZE, SIZE).contiguous()
    whole = torch.tensor([[0.0, 0.0, SIZE, SIZE]])
    torch.testing.assert_close(aug.resized_crop(ramp, whole), ramp)
    half = torch.tensor([[0.0, 0.0, SIZE, SIZE / 2]])
    expected = ((torch.arange(SIZE) + 0.5) / 2 - 0.5).clamp(0, SIZE / 2 - 1)
    torch.testing.assert_close(aug.resized_crop(ramp, half)[0, 0, 3], expected)
    mirrored = aug.resized_crop(ramp, half, flip=torch.tensor([True]))
    torch.testing.assert_close(mirrored[0, 0, 3], expected.flip(0))


def test_resized_crops_equal_cutting_the_box_and_resizing_it():
    """torchvision's resized_crop on tensors: crop, then bilinear resize without antialias,
    which is F.interpolate's; the drawn flips mirror the result."""
    images = photos(40, seed=5)
    params = Augment("resized_crop").sample(40, (SIZE, SIZE), generator(8))
    out = aug.resized_crop(images, params["box"], params["flip"])
    for image, box, flip, got in zip(images, params["box"].int().tolist(), params["flip"], out):
        top, left, height, width = box
        want = F.interpolate(image[None, :, top:top + height, left:left + width],
                             size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(got, want.flip(-1) if flip else want, atol=1e-5, rtol=0)


def test_resized_crop_boxes_follow_torchvisions_ranges():
    boxes = Augment("resized_crop", scale=(0.2, 0.9)).sample(3000, (84, 84), generator(6))["box"]
    top, left, height, width = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 84).all() and (left + width <= 84).all()
    share = height * width / 84 ** 2
    assert share.min() > 0.18 and share.max() < 0.92  # the scale range, give or take rounding
    assert (width / height).min() > 0.7 and (width / height).max() < 1.45
    assert torch.equal(boxes, boxes.round())  # whole pixels, as torchvision's


# ---------------------------------------------------------------- seeding


def test_the_same_key_gives_the_same_images_and_other_keys_other_images():
    images = photos(6)
    augment = Augment()
    first = augment.each(images, [(0, 3, 1), (0, 3, 2)])
    assert torch.equal(first, augment.each(images, [(0, 3, 1), (0, 3, 2)]))
    # group 2's images depend on its key alone, not on the group before it
    assert torch.equal(first[3:], augment.each(images[3:], [(0, 3, 2)]))
    for other in ((0, 4, 1), (1, 3, 1), (0, 3, 5)):
        assert not torch.equal(first[:3], augment.each(images[:3], [other]))


def test_augmentation_draws_apart_from_the_global_generator():
    images = photos(4)
    torch.manual_seed(0)
    a = Augment().each(images, [(1, 2, 3)])
    torch.manual_seed(1)
    b = Augment().each(images, [(1, 2, 3)])
    assert torch.equal(a, b)


# ---------------------------------------------------------------- tasks


def synthetic_pool(classes=12, per_class=8) -> shards.ClassPool:
    images = (photos(classes * per_class, seed=9) * 255).round().to(torch.uint8)
    return shards.ClassPool(images=images, counts=np.full(classes, per_class),
                            classes=[{"id": str(c)} for c in range(classes)], part="train",
                            shard_dir=Path("synthetic"))


SPEC = TaskSpec(5, 2, 3)
AUGMENTED = TaskSpec(5, 2, 3, augment=Augment(padding=2))


def test_every_support_and_query_image_of_a_task_is_augmented():
    pool = synthetic_pool()
    plain = MemoryTasks(pool, SPEC, seed=1).batch(4, range(3))
    done = MemoryTasks(pool, AUGMENTED, seed=1).batch(4, range(3))
    for key in ("support_y", "query_y"):
        assert torch.equal(plain[key], done[key])
    for key in ("support_x", "query_x"):
        assert done[key].shape == plain[key].shape and done[key].dtype == torch.float32
        changed = (done[key] != plain[key]).flatten(2).any(2)
        assert changed.all(), f"{key}: some images left as they were"
    # what was augmented is those images: task 1's support with task 1's key
    keys = [(1, 4, 1)]
    support = AUGMENTED.augment.each(
        torch.cat([plain["support_x"][1], plain["query_x"][1]]), keys)[:10]
    torch.testing.assert_close(done["support_x"][1], support, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["lee2019", "resized_crop"])
def test_augmented_tasks_are_the_same_for_any_world_size_and_differ_by_step(kind):
    spec = TaskSpec(5, 2, 3, augment=Augment(kind, padding=2))
    tasks = MemoryTasks(synthetic_pool(), spec, seed=2)
    whole = tasks.batch(7, range(8))
    for world in (2, 4):
        parts = [tasks.batch(7, rank_slice(8, rank, world)) for rank in range(world)]
        for key in whole:
            assert torch.equal(whole[key], torch.cat([p[key] for p in parts]))
    again = MemoryTasks(synthetic_pool(), spec, seed=2).batch(7, range(8))
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    later = tasks.batch(8, range(8))
    assert not torch.equal(whole["support_x"], later["support_x"])


def test_stream_tasks_are_augmented_and_reproducible(packed):
    out = packed("futurama")
    spec = TaskSpec(5, 1, 2, augment=Augment(padding=3))

    def batches(augmented_spec):
        stream = episodes.make_tasks(out, "train", augmented_spec, seed=3, mode="stream",
                                     tasks_per_batch=2, batches=2, rank=0, world=1,
                                     shuffle_buffer=16)
        return list(stream)

    first, again = batches(spec), batches(spec)
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    plain = batches(TaskSpec(5, 1, 2))
    assert not torch.equal(first[0]["support_x"], plain[0]["support_x"])
    assert torch.equal(first[0]["support_y"], plain[0]["support_y"])  # the same tasks


def test_only_training_tasks_are_augmented():
    cfg = cfglib.Config()
    cfg.data.augment = "lee2019"
    assert task_spec(cfg, "train").augment == Augment()
    assert task_spec(cfg, "val").augment is None and task_spec(cfg, "test").augment is None
    assert episode_shape(5, 1, 15).augment is None  # held-out evaluation and prediction
    cfg.data.augment = "none"
    assert task_spec(cfg, "train").augment is None


# ---------------------------------------------------------------- config


def test_the_config_offers_the_kinds_the_module_has():
    assert cfglib.CHOICES["data.augment"] == aug.KINDS


@pytest.mark.parametrize("override, words", [
    ("data.augment=flips", "choose one of none, lee2019, resized_crop"),
    ("data.augment_padding=-1", "must not be negative"),
    ("data.augment_scale=[0.5,0.2]", "0 < low <= high <= 1"),
    ("data.augment_jitter=[0.4,0.4]", "three strengths in [0, 1]"),
    ("data.augment_jitter=[0.4,1.5,0.4]", "three strengths in [0, 1]"),
])
def test_impossible_augmentation_settings_are_refused_in_one_line(override, words):
    with pytest.raises(cfglib.ConfigError, match=r"data\.augment") as error:
        cfglib.load_config("configs/folder_example.yaml", [override])
    assert words in str(error.value) and "\n" not in str(error.value)


def test_natural_image_configs_augment_and_omniglot_configs_do_not():
    names = cfglib.shipped_config_names()
    natural = [n for n in names if n.startswith(("miniimagenet/", "folder"))]
    assert natural
    for name in natural:
        assert cfglib.load_config(name).data.augment == "lee2019", name
    # RESULTS recipes: shifts, no jitter (the second adds test-time shifts)
    shifted = ("results/vinyals_protonet_20w1s_shift", "results/vinyals_protonet_20w1s_shift_tta")
    for name in names:
        if cfglib.load_config(name).data.dataset == "omniglot" and name not in shifted:
            assert cfglib.load_config(name).data.augment == "none", name
    for name in shifted:
        shift = cfglib.load_config(name).data
        assert (shift.augment, shift.augment_jitter, shift.augment_flip) == ("lee2019", [0] * 3,
                                                                             False), name
    assert cfglib.load_config("mamlpp/miniimagenet_cnn_maml_5w1s").data.augment == "none"
