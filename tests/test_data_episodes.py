"""Tasks: valid N-way K-shot Q-query episodes, no leakage, identical global batches for any
world size."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fsl_dist.data import episodes, shards
from fsl_dist.data.episodes import MemoryTasks, TaskSpec, rank_slice

SPECS = [TaskSpec(5, 1, 15, rotate=True), TaskSpec(20, 1, 5, rotate=True), TaskSpec(5, 5, 15)]


@pytest.fixture(scope="module")
def vinyals(packed):
    out = packed("vinyals")
    return {part: shards.load_class_pool(out, part) for part in ("train", "val", "test")}


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def check_batch_format(batch, tasks, spec, size=28):
    n, k, q = spec.n_way, spec.k_shot, spec.q_query
    assert set(batch) == set(episodes.BATCH_KEYS)
    assert batch["support_x"].shape == (tasks, n * k, 1, size, size)
    assert batch["query_x"].shape == (tasks, n * q, 1, size, size)
    assert batch["support_y"].shape == (tasks, n * k) and batch["query_y"].shape == (tasks, n * q)
    assert batch["support_x"].dtype == batch["query_x"].dtype == torch.float32
    assert batch["support_y"].dtype == batch["query_y"].dtype == torch.int64
    for key in ("support_x", "query_x"):
        assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
        assert batch[key].mean() < 0.25  # strokes bright on a dark background


def distinct_per_row(array: np.ndarray) -> bool:
    ordered = np.sort(array.reshape(-1, array.shape[-1]), axis=1)
    return bool((np.diff(ordered, axis=1) != 0).all())


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_memory_tasks_are_valid(vinyals, spec):
    """Sampled indices obey the task rules, and the images and labels are exactly those indices."""
    pool = vinyals["train"]
    tasks = MemoryTasks(pool, spec, seed=7)
    n, k, q, count = spec.n_way, spec.k_shot, spec.q_query, 100
    for step in range(3):
        sampled, batch = tasks.indices(step, range(count)), tasks.batch(step, range(count))
        check_batch_format(batch, count, spec)
        assert distinct_per_row(sampled.classes)  # N distinct classes per task
        assert distinct_per_row(sampled.drawings)  # K+Q distinct drawings: support, query disjoint
        assert (np.sort(sampled.labels, axis=1) == np.arange(n)).all()
        assert torch.equal(batch["support_y"],
                           torch.from_numpy(np.repeat(sampled.labels, k, axis=1)))
        assert torch.equal(batch["query_y"], torch.from_numpy(np.repeat(sampled.labels, q, axis=1)))
        assert spec.rotate or not sampled.rotations.any()
        # Rebuild the images the slow, obvious way: index the pool, then turn each class.
        by_class = pool.images.view(pool.num_classes, 20, 1, 28, 28)  # Omniglot: 20 per class
        expected = by_class[torch.from_numpy(sampled.classes)[:, :, None],
                            torch.from_numpy(sampled.drawings)]
        for turns in (1, 2, 3):
            mask = torch.from_numpy(sampled.rotations == turns)
            expected[mask] = torch.rot90(expected[mask], turns, dims=(-2, -1))
        assert torch.equal(to_uint8(batch["support_x"]).view(count, n, k, 1, 28, 28),
                           expected[:, :, :k])
        assert torch.equal(to_uint8(batch["query_x"]).view(count, n, q, 1, 28, 28),
                           expected[:, :, k:])


def rotated_sample(vinyals):
    tasks = MemoryTasks(vinyals["train"], TaskSpec(5, 1, 15, rotate=True), seed=0)
    return tasks.indices(0, range(200))


def test_rotations_take_all_four_values(vinyals):
    assert set(rotated_sample(vinyals).rotations.ravel().tolist()) == {0, 1, 2, 3}


def test_label_order_varies(vinyals):
    # label 0 is not always the first class
    assert set(rotated_sample(vinyals).labels[:, 0].tolist()) == set(range(5))


def held_out_ids(vinyals):
    return {c["id"] for part in ("val", "test") for c in vinyals[part].classes}


def train_ids_seen(vinyals):
    """Character ids of the classes in 10 steps of 64 rotated 20-way meta-training tasks."""
    train_ids = np.array([c["id"] for c in vinyals["train"].classes])
    tasks = MemoryTasks(vinyals["train"], TaskSpec(20, 1, 5, rotate=True), seed=3)
    return {int(i) for step in range(10)
            for i in train_ids[tasks.indices(step, range(64)).classes].ravel()}


def test_train_part_holds_no_val_or_test_character(vinyals):
    assert held_out_ids(vinyals).isdisjoint(c["id"] for c in vinyals["train"].classes)


def test_meta_train_never_sees_val_or_test_characters(vinyals):
    assert train_ids_seen(vinyals).isdisjoint(held_out_ids(vinyals))


def test_meta_train_uses_the_whole_train_part(vinyals):
    assert len(train_ids_seen(vinyals)) > 1000


@pytest.mark.parametrize("world", [1, 2, 4])
def test_same_global_batch_for_any_world_size(vinyals, world):
    total = 8  # the val part keeps the per-rank (rotated) pools small; the code path is the same
    reference = MemoryTasks(vinyals["val"], TaskSpec(5, 1, 15, rotate=True), seed=11)
    for step in (0, 1, 123456):
        whole = reference.batch(step, range(total))
        # Each rank builds its own sampler, as separate processes would.
        parts = [MemoryTasks(vinyals["val"], TaskSpec(5, 1, 15, rotate=True), seed=11)
                 .batch(step, rank_slice(total, rank, world)) for rank in range(world)]
        for key in episodes.BATCH_KEYS:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), (key, step, world)


# Tasks depend only on the seed, the step and the task's index: one test per way that could fail.
def part_tasks(vinyals, seed=5):
    return MemoryTasks(vinyals["test"], TaskSpec(5, 1, 15), seed=seed)


def test_a_new_sampler_with_the_same_seed_gives_the_same_tasks(vinyals):
    resumed = part_tasks(vinyals)  # e.g. after a restart at step 9
    a = part_tasks(vinyals).batch(9, [3, 4, 5])
    assert torch.equal(resumed.batch(9, [3, 4, 5])["query_x"], a["query_x"])


def test_a_task_does_not_depend_on_the_other_indices_requested(vinyals):
    tasks = part_tasks(vinyals)
    a = tasks.batch(9, [3, 4, 5])
    # the order of the request is irrelevant
    assert torch.equal(tasks.batch(9, [5])["query_x"][0], a["query_x"][2])


def test_another_step_gives_another_task(vinyals):
    tasks = part_tasks(vinyals)
    a = tasks.batch(9, [3, 4, 5])
    assert not torch.equal(tasks.batch(10, [3])["query_x"], a["query_x"][:1])


def test_another_seed_gives_another_task(vinyals):
    a = part_tasks(vinyals).batch(9, [3, 4, 5])
    assert not torch.equal(part_tasks(vinyals, seed=6).batch(9, [3])["query_x"], a["query_x"][:1])


def test_evaluation_episodes_split_across_processes_equal_the_undivided_episodes(vinyals):
    tasks = part_tasks(vinyals)
    episodes_all = tasks.batch(0, range(12))
    halves = [tasks.batch(0, range(0, 6))["support_x"], tasks.batch(0, range(6, 12))["support_x"]]
    assert torch.equal(torch.cat(halves), episodes_all["support_x"])


# ----------------------------------------------------------------------------- stream mode


def image_lookup(pool, rotations=(0,)):
    """Bytes of every (possibly rotated) drawing -> all (class id, drawer, rotation) it could be."""
    lookup = {}
    for turns in rotations:
        for c, meta in enumerate(pool.classes):
            turned = torch.rot90(pool.class_images(c), turns, dims=(-2, -1)).contiguous().numpy()
            for d in range(turned.shape[0]):
                lookup.setdefault(turned[d, 0].tobytes(), []).append((meta["id"], d, turns))
    return lookup


def identify_task(support, support_y, query, query_y, lookup, spec):
    """Check one task by its pixels alone; return the class id behind each label."""
    n, k, q = spec.n_way, spec.k_shot, spec.q_query
    found = {}
    for label in range(n):
        images = [to_uint8(x[0]).numpy().tobytes()
                  for x, y in [*zip(support, support_y), *zip(query, query_y)] if y == label]
        assert len(images) == k + q
        candidates = [{(i, r) for i, _, r in lookup[image]} for image in images]
        common = set.intersection(*candidates)
        assert len(common) == 1, f"label {label}: images of several classes or rotations"
        found[label] = common.pop()
        for image in set(images):  # distinct drawings (one known duplicate pair of images exists)
            assert images.count(image) <= sum((i, r) == found[label] for i, _, r in lookup[image])
    assert len({cls for cls, _ in found.values()}) == n, "two labels share a class"
    return {label: cls for label, (cls, _) in found.items()}


def check_stream_batch(batch, spec, tasks, lookup):
    check_batch_format(batch, tasks, spec)
    ids = set()
    for t in range(tasks):
        ids |= set(identify_task(batch["support_x"][t], batch["support_y"][t], batch["query_x"][t],
                                 batch["query_y"][t], lookup, spec).values())
    return ids


def test_stream_tasks_are_valid_and_from_train_only(packed):
    out = packed("futurama")
    train = shards.load_class_pool(out, "train")
    held_out = {c["id"] for part in ("val", "test")
                for c in shards.load_class_pool(out, part).classes}
    lookup = image_lookup(train)
    spec = TaskSpec(5, 1, 15)
    seen = set()
    for rank in range(2):
        stream = episodes.make_tasks(out, "train", spec, seed=0, mode="stream", tasks_per_batch=4,
                                     batches=6, rank=rank, world=2, shuffle_buffer=64)
        batches = list(stream)
        assert len(batches) == 6
        for batch in batches:
            seen |= check_stream_batch(batch, spec, 4, lookup)
    assert seen and seen.isdisjoint(held_out)


def test_stream_with_workers_and_rotation(packed):
    out = packed("futurama")
    spec = TaskSpec(20, 1, 5, rotate=True)
    lookup = image_lookup(shards.load_class_pool(out, "test"), rotations=(0, 1, 2, 3))
    stream = episodes.make_tasks(out, "test", spec, seed=1, mode="stream", tasks_per_batch=3,
                                 batches=5, rank=0, world=1, shuffle_buffer=32)
    batches = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert len(batches) == 5
    for batch in batches:
        check_stream_batch(batch, spec, 3, lookup)


def same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_rank_batch_reads_a_rewound_step_again_and_the_next_step_after_it(packed, mode):
    # The trainer's one call for both modes (TrainBatches), its probe's rewind included.
    out = packed("futurama")
    sampler = episodes.make_tasks(out, "train", TaskSpec(5, 1, 2), seed=3, mode=mode,
                                  tasks_per_batch=2, batches=4, rank=1, world=2)
    mine = rank_slice(4, 1, 2)
    first = sampler.rank_batch(2, mine)
    sampler.rewind()
    assert same_batch(sampler.rank_batch(2, mine), first)
    assert not same_batch(sampler.rank_batch(3, mine), first)
    if mode == "memory":
        assert same_batch(sampler.rank_batch(2, mine), first)  # a pure function of its step
    else:
        with pytest.raises(ValueError, match="hold 2 tasks, not 3"):
            sampler.rank_batch(4, range(3))


def test_shards_divide_among_ranks_and_workers():
    entries = [(f"s{i}", 32) for i in range(12)]
    shares = [episodes.assign_shards(entries, r, 2, w, 3, min_classes=5)
              for r in range(2) for w in range(3)]
    # a disjoint cover
    assert sorted(s for share in shares for s in share) == sorted(p for p, _ in entries)
    assert all(len(share) == 2 for share in shares)


# Fewer shards than ranks x workers: a worker falls back to its rank's shards, then to all.
@pytest.mark.parametrize("rank, world, worker, workers, min_classes, expected", [
    (1, 2, 1, 2, 5, ["b"]),
    (1, 2, 3, 4, 5, ["b"]),
    (3, 4, 0, 1, 5, ["a", "b", "c"]),
    (0, 2, 0, 1, 70, ["a", "b", "c"]),
])
def test_too_few_shards_fall_back_to_the_ranks_then_to_all(rank, world, worker, workers,
                                                           min_classes, expected):
    few = [("a", 32), ("b", 32), ("c", 32)]
    assert episodes.assign_shards(few, rank, world, worker, workers,
                                  min_classes=min_classes) == expected
