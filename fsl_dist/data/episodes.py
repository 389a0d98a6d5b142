"""N-way K-shot Q-query tasks from a shard set, as meta-batches of tensors.

Every meta-batch is a dict with exactly these keys (T tasks, N ways, K shots, Q queries)::

    support_x  float32 [T, N*K, C, H, W]  in [0, 1] (Omniglot: C = 1, strokes bright on dark)
    support_y  int64   [T, N*K]           labels 0..N-1, assigned to classes in a random order
    query_x    float32 [T, N*Q, C, H, W]
    query_y    int64   [T, N*Q]

Support and query come from disjoint images of the same N distinct classes. Classes may hold
different numbers of images: a class with fewer than K+Q is never drawn for such a task. With
``TaskSpec.rotate`` each sampled class is turned by a random multiple of 90 degrees (all its
images alike), which makes it a new class, as in the MAML protocol for Omniglot; natural images
are not rotated (``data.rotate: false``, as ``configs/folder_example.yaml`` sets). With
``TaskSpec.augment`` (``fsl_dist.data.augment``) every support and query image of a task is
cropped, colour-jittered and flipped, with parameters seeded by the task as its classes are.

Two modes give the same format:

- ``MemoryTasks`` (memory mode): the part's class pool is in memory and task ``i`` of step ``s``
  is a pure function of ``(seed, s, i)``. Each rank asks for its own contiguous slice of the
  step's task indices (``rank_slice``), so the global meta-batch is the same for any number of
  processes, a resumed run sees the tasks it would have seen, and no two ranks share a task.
- ``StreamTasks`` (stream mode): an ``IterableDataset`` reading shards divided among ranks and
  DataLoader workers, resampled forever (no rank runs dry) through a shuffle buffer of classes.

Example::

    spec = TaskSpec(n_way=5, k_shot=1, q_query=15, rotate=True)
    tasks = make_tasks("shards/omniglot-vinyals", "train", spec, seed=0)
    batch = tasks.batch(step, rank_slice(32, rank, world))   # this rank's 32 // world tasks
"""

from __future__ import annotations

import itertools
import random
import tarfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from fsl_dist.config import DataConfig
from fsl_dist.data import shards as shardlib
from fsl_dist.data.augment import Augment

MODES = ("memory", "stream")
BATCH_KEYS = ("support_x", "support_y", "query_x", "query_y")


@dataclass(frozen=True)
class TaskSpec:
    """Shape of one few-shot task."""

    n_way: int  # classes per task
    k_shot: int  # labelled images per class (support set)
    q_query: int  # images per class to classify (query set)
    rotate: bool = False  # turn each sampled class by a random multiple of 90 degrees
    augment: Optional[Augment] = None  # augment every image of a task (training tasks only)

    def __post_init__(self):
        for name in ("n_way", "k_shot", "q_query"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TaskSpec.{name} must be a positive integer, got {value!r}")

    @property
    def images_per_class(self) -> int:
        return self.k_shot + self.q_query


def check_spec_fits(spec: TaskSpec, counts, where: str) -> None:
    """Raise a clear ValueError if tasks of ``spec`` cannot be drawn from classes holding
    ``counts`` images each: at least N of them must hold K+Q images."""
    counts = np.asarray(counts, dtype=np.int64)
    needed = spec.images_per_class
    if spec.n_way > len(counts):
        raise ValueError(f"{spec.n_way}-way tasks need {spec.n_way} classes but {where} has only "
                         f"{len(counts)}; lower n_way or use a part with more classes")
    qualifying = int((counts >= needed).sum())
    if qualifying >= spec.n_way:
        return
    largest = int(counts.max())
    if largest < needed and largest == int(counts.min()):  # every class holds the same number
        raise ValueError(f"k_shot + q_query = {spec.k_shot} + {spec.q_query} = {needed} exceeds "
                         f"the {largest} images per class of {where}; lower q_query to at most "
                         f"{largest - spec.k_shot}")
    raise ValueError(f"{spec.n_way}-way tasks with k_shot + q_query = {needed} images per class "
                     f"need {spec.n_way} classes holding at least {needed} images, but only "
                     f"{qualifying} of the {len(counts)} classes of {where} do; lower n_way, "
                     f"k_shot or q_query")


def check_augment_channels(spec: TaskSpec, channels: int, where: str) -> None:
    """Colour jitter is defined for grey (1) and RGB (3) images only."""
    if spec.augment is not None and channels not in (1, 3):
        raise ValueError(f"augmentation {spec.augment.kind!r} needs images of 1 or 3 channels; "
                         f"{where} has {channels}: set data.augment=none")


def rank_slice(total: int, rank: int, world: int) -> range:
    """The contiguous task indices ``rank`` (of ``world``) handles out of ``total`` per step."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1} (world size {world})")
    if total % world:
        raise ValueError(f"{total} tasks per meta-batch do not divide among {world} processes; "
                         f"choose a meta-batch size that is a multiple of {world}")
    share = total // world
    return range(rank * share, (rank + 1) * share)


@dataclass(frozen=True)
class TaskIndices:
    """What was sampled for T tasks, as positions into a class pool."""

    classes: np.ndarray  # int64 [T, N]: pool position of each task's n-th class
    drawings: np.ndarray  # int64 [T, N, K+Q]: image indices within the class; first K: support
    rotations: np.ndarray  # int64 [T, N]: quarter turns (counter-clockwise) of each class
    labels: np.ndarray  # int64 [T, N]: label given to each task's n-th class


def _sample_one(rng: np.random.Generator, eligible: np.ndarray, counts: np.ndarray,
                widest: int, spec: TaskSpec):
    """Classes, images, rotations and labels of one task from one generator.

    ``eligible`` are the pool positions of the classes holding at least K+Q images, ``widest``
    the largest class of the pool: the draws depend on the pool, never on the task's classes."""
    classes = eligible[rng.choice(len(eligible), spec.n_way, replace=False)]
    labels = rng.permutation(spec.n_way)
    picks = _pick_drawings(rng, counts[classes], widest, spec.images_per_class)
    turns = rng.integers(0, 4, spec.n_way) if spec.rotate else np.zeros(spec.n_way, np.int64)
    return classes, picks, turns, labels


def _pick_drawings(rng: np.random.Generator, counts: np.ndarray, widest: int,
                   count: int) -> np.ndarray:
    """[classes, count] distinct image indices per class (class j has ``counts[j]``): argsort of
    noise, one call for all; indices past a class's end sort last, so they are never taken."""
    noise = rng.random((len(counts), widest))
    noise[np.arange(widest)[None, :] >= np.asarray(counts)[:, None]] = 2.0
    return noise.argsort(axis=1, kind="stable")[:, :count]


def _empty_indices(tasks: int, spec: TaskSpec) -> TaskIndices:
    n = spec.n_way
    return TaskIndices(np.empty((tasks, n), np.int64),
                       np.empty((tasks, n, spec.images_per_class), np.int64),
                       np.empty((tasks, n), np.int64), np.empty((tasks, n), np.int64))


def assemble(support: torch.Tensor, query: torch.Tensor, labels: np.ndarray) -> dict:
    """uint8 support ``[T, N, K, C, H, W]`` and query ``[T, N, Q, C, H, W]`` -> the meta-batch.

    ``labels[t, n]`` is the label of class n of task t; images are already rotated.
    """
    tasks, n, k, *image = support.shape
    q = query.shape[2]
    label = torch.from_numpy(labels).to(torch.int64)[:, :, None]
    return {
        "support_x": to_unit_float(support).reshape(tasks, n * k, *image),
        "support_y": label.expand(tasks, n, k).reshape(tasks, n * k),
        "query_x": to_unit_float(query).reshape(tasks, n * q, *image),
        "query_y": label.expand(tasks, n, q).reshape(tasks, n * q),
    }


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1; floats (augmented images) are already there."""
    if images.is_floating_point():
        return images
    return images.to(torch.float32).mul_(1.0 / 255.0)


def augment_tasks(augment: Augment, support: torch.Tensor, query: torch.Tensor,
                  keys: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 support [T, N, K, C, H, W] and query [T, N, Q, C, H, W] -> float ones, every image
    augmented; task t's images (its support, then its query, class by class) take their
    parameters in that order from ``generator(*keys[t])``. MetaOptNet's code augments every
    image of a training episode, support and query alike (its training set's transform)."""
    tasks, n, k, *image = support.shape
    q = query.shape[2]
    both = torch.cat([support.reshape(tasks, n * k, *image), query.reshape(tasks, n * q, *image)],
                     dim=1)
    done = augment.each(both.reshape(-1, *image), keys).view(tasks, n * (k + q), *image)
    return done[:, :n * k].reshape(support.shape), done[:, n * k:].reshape(query.shape)


# ----------------------------------------------------------------------------- memory mode


class MemoryTasks:
    """Tasks sampled from a class pool in memory; task i of step s depends only on (seed, s, i).

    The constructor only validates: no I/O, no sampling.
    """

    def __init__(self, pool: shardlib.ClassPool, spec: TaskSpec, seed: int):
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        where = f"part {pool.part!r} of {pool.shard_dir}"
        check_spec_fits(spec, pool.counts, where)
        if spec.rotate and pool.images.shape[-1] != pool.images.shape[-2]:
            raise ValueError(f"rotation needs square images; {where} has "
                             f"{tuple(pool.images.shape[-2:])}")
        check_augment_channels(spec, pool.images.shape[1], where)
        self.pool = pool
        self.spec = spec
        self.seed = seed
        self._eligible = np.flatnonzero(pool.counts >= spec.images_per_class)
        self._offsets = pool.offsets
        self._rows = None  # flat (rotated) pool, built by the first batch

    def indices(self, step: int, indices: range | Sequence[int]) -> TaskIndices:
        """Sample tasks ``indices`` of ``step``: one generator per task, seeded by
        (seed, step, i)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        out = _empty_indices(len(indices), self.spec)
        counts = self.pool.counts
        widest = int(counts.max())
        for row, task in enumerate(indices):
            if task < 0:
                raise ValueError(f"task index must be non-negative, got {task}")
            rng = np.random.default_rng((self.seed, step, task))
            sample = _sample_one(rng, self._eligible, counts, widest, self.spec)
            out.classes[row], out.drawings[row], out.rotations[row], out.labels[row] = sample
        return out

    def batch(self, step: int, indices: range | Sequence[int]) -> dict:
        """The meta-batch of tasks ``indices`` of ``step`` (leading dimension ``len(indices)``)."""
        sampled = self.indices(step, indices)
        # One row per (rotation, image) of the flat pool: two index_select calls fetch support
        # and query already contiguous, so reshaping them copies nothing.
        first = sampled.rotations * len(self.pool.images) + self._offsets[sampled.classes]
        rows = torch.from_numpy(first[:, :, None] + sampled.drawings)
        k = self.spec.k_shot
        support = self._gather(rows[:, :, :k])
        query = self._gather(rows[:, :, k:])
        if self.spec.augment is not None:  # seeded as the task: the same on any rank, on resume
            keys = [(self.seed, step, task) for task in indices]
            support, query = augment_tasks(self.spec.augment, support, query, keys)
        return assemble(support, query, sampled.labels)

    def rank_batch(self, step: int, my_tasks: range) -> dict:
        """This rank's tasks ``my_tasks`` of ``step``: the trainer's one call for either mode."""
        return self.batch(step, my_tasks)

    def rewind(self) -> None:
        """Nothing to rewind: every batch is a pure function of its step."""

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        image = self.pool.images.shape[1:]
        picked = self._flat_pool().index_select(0, rows.reshape(-1))
        return picked.view(*rows.shape, *image)

    def _flat_pool(self) -> torch.Tensor:
        """Pool as rows of pixels ``[R * I, C * H * W]`` (I images), R = 4 rotations if rotating.

        Built on first use (not in the constructor) and kept: 4 x 17 MB for Omniglot's largest
        train part, in exchange for rotation costing nothing per task.
        """
        if self._rows is None:
            images = self.pool.images
            turned = [torch.rot90(images, k, dims=(-2, -1))
                      for k in range(4 if self.spec.rotate else 1)]
            self._rows = torch.stack(turned).reshape(-1, images[0].numel())
        return self._rows


# ----------------------------------------------------------------------------- stream mode


def assign_shards(entries: list[tuple[Path, int]], rank: int, world: int, worker: int,
                  workers: int, min_classes: int) -> list[Path]:
    """This (rank, worker)'s shards: every world-th shard from ``rank``, then every workers-th.

    This is ``wds.split_by_node`` followed by ``wds.split_by_worker``, with rank and worker given
    explicitly. Where a share would hold fewer than ``min_classes`` classes (fewer shards than
    ranks x workers), the share falls back to the rank's shards, then to all shards: resampling
    keeps every stream infinite either way, so no rank runs dry.
    """
    by_rank = entries[rank::world]
    by_worker = by_rank[worker::workers]
    for share in (by_worker, by_rank, entries):
        if sum(classes for _, classes in share) >= min_classes:
            return [path for path, _ in share]
    return [path for path, _ in entries]


class StreamTasks(IterableDataset):
    """Meta-batches of tasks from shards streamed through a shuffle buffer of classes.

    Yields ``batches`` meta-batches per epoch for this rank (split among the DataLoader's workers),
    each of ``tasks_per_batch`` tasks: the rank's share of the global meta-batch. Use it with
    ``DataLoader(stream, batch_size=None, num_workers=...)``. Sampling is seeded by
    (seed, rank, worker, epoch); call ``set_epoch`` for a new stream each epoch.

    The constructor only validates; shards are opened when iterated.
    """

    def __init__(self, shards: list[tuple[Path, int]], spec: TaskSpec, *, counts,
                 seed: int, tasks_per_batch: int, batches: int,
                 rank: int | None = None, world: int | None = None, shuffle_buffer: int = 256,
                 where: str = "the stream"):
        """``shards``: (path, classes in it holding at least K+Q images); ``counts``: the
        images of every class of the part (the manifest's ``images_per_class``)."""
        super().__init__()
        check_spec_fits(spec, counts, where)
        if not shards:
            raise ValueError(f"{where} lists no shards; re-pack the shard set")
        for name, value in (("tasks_per_batch", tasks_per_batch), ("batches", batches),
                            ("shuffle_buffer", shuffle_buffer)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if (rank is None) != (world is None):
            raise ValueError("give both rank and world, or neither (then they are read from the "
                             "environment / torch.distributed when iterating)")
        if world is not None and (world < 1 or not 0 <= rank < world):
            raise ValueError(f"rank {rank} is outside 0..{world - 1} (world size {world})")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.shards = list(shards)
        self.spec = spec
        self.widest = int(max(counts))
        self.seed = seed
        self.tasks_per_batch = tasks_per_batch
        self.batches = batches
        self.rank, self.world = rank, world
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self._opened = None  # rank_batch's stream

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_batch(self, step: int, my_tasks: range) -> dict:
        """The next meta-batch of this rank's stream, ``my_tasks`` long (the trainer's one call
        for either mode). The first call, and the first after ``rewind``, opens the stream
        reseeded from ``step``: a resumed run's stream is reproducible, not the uninterrupted
        one."""
        if len(my_tasks) != self.tasks_per_batch:
            raise ValueError(f"this stream's meta-batches hold {self.tasks_per_batch} tasks, "
                             f"not {len(my_tasks)}")
        if self._opened is None:
            self.set_epoch(step)
            self._opened = iter(self)
        return next(self._opened)

    def rewind(self) -> None:
        """The next ``rank_batch(step)`` opens the stream again from that step."""
        self._opened = None

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        rank, world = self._rank_and_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        my_batches = self.batches // workers + (worker < self.batches % workers)
        paths = assign_shards(self.shards, rank, world, worker, workers, self.spec.n_way)
        rng = np.random.default_rng((self.seed, rank, worker, self.epoch))
        classes = self._class_stream(paths, rng)
        pending: deque = deque()
        for _ in range(my_batches):
            yield self._next_batch(classes, pending, rng)

    def _rank_and_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        return rank, world

    def _class_stream(self, paths: list[Path], rng: np.random.Generator):
        """Endless (images [n, C, H, W], metadata) from shards picked at random, then shuffled;
        classes with fewer than K+Q images are left out."""
        shard_rng = random.Random(int(rng.integers(2**62)))
        urls = ({"url": str(paths[shard_rng.randrange(len(paths))])} for _ in itertools.count())
        samples = wds.tarfile_to_samples()(urls)
        shuffled = iter(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                    rng=random.Random(int(rng.integers(2**62))))(samples))
        while True:
            try:
                sample = next(shuffled)
            except (OSError, tarfile.TarError) as error:
                raise _shard_failed(error) from error
            images, meta = shardlib.decode_class_sample(sample, sample.get("__url__", "a shard"))
            if len(images) >= self.spec.images_per_class:
                yield images, meta

    def _next_batch(self, classes, pending: deque, rng: np.random.Generator) -> dict:
        spec = self.spec
        per_task = []
        for _ in range(self.tasks_per_batch):
            chosen = _take_distinct(classes, pending, spec.n_way)
            counts = np.array([len(images) for images in chosen])
            picks = _pick_drawings(rng, counts, self.widest, spec.images_per_class)
            per_task.append(np.stack([images[p] for images, p in zip(chosen, picks)]))
        labels = np.stack([rng.permutation(spec.n_way) for _ in per_task])
        images = np.stack(per_task)  # [T, N, K+Q, C, H, W]
        if spec.rotate:
            images = _turn_each_class(images, rng.integers(0, 4, labels.shape))
        images = torch.from_numpy(images)
        k = spec.k_shot
        support, query = images[:, :, :k].contiguous(), images[:, :, k:].contiguous()
        if spec.augment is not None:  # seeded from the stream's generator, as its tasks are
            keys = [(int(seed),) for seed in rng.integers(2**63, size=len(labels))]
            support, query = augment_tasks(spec.augment, support, query, keys)
        return assemble(support, query, labels)


def _shard_failed(error: Exception) -> shardlib.ShardError:
    """A shard that cannot be opened or read while streaming (the set was verified at the start,
    so it changed during the run), as one line naming the file: webdataset appends the shard's
    url to the error's args, and "@ <file object>" to a tar error's message."""
    url = error.args[-1] if error.args and isinstance(error.args[-1], str) else "a shard"
    fix = (f"put it back, or re-pack the set at {Path(url).parent}, then continue with "
           "--resume auto")
    if isinstance(error, FileNotFoundError):
        return shardlib.ShardError(f"shard {url} disappeared while the run was reading its set "
                                   f"(deleted or moved after the start); {fix}")
    why = error.strerror if isinstance(error, OSError) and error.strerror else str(error.args[0])
    return shardlib.ShardError(f"shard {url} cannot be read any more "
                               f"({why.split(' @ ')[0].splitlines()[0]}); it changed after the run "
                               f"started: {fix}")


def _turn_each_class(images: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Rotate all images of class [t, n] by turns[t, n] quarter turns (counter-clockwise)."""
    turned = np.empty_like(images)
    for t, n in np.ndindex(turns.shape):
        turned[t, n] = np.rot90(images[t, n], int(turns[t, n]), axes=(-2, -1))
    return turned


def _take_distinct(classes, pending: deque, n: int) -> list[np.ndarray]:
    """Next n classes of the stream with distinct ids; repeats wait in ``pending`` for later."""
    chosen, ids, skipped = [], set(), []
    while len(chosen) < n:
        images, meta = pending.popleft() if pending else next(classes)
        if meta["id"] in ids:
            skipped.append((images, meta))
            if len(skipped) > 1000 * n:
                raise RuntimeError(f"the stream repeats fewer than {n} distinct classes; "
                                   "its shards hold too few classes for this task size")
        else:
            chosen.append(images)
            ids.add(meta["id"])
    pending.extendleft(reversed(skipped))
    return chosen


# ----------------------------------------------------------------------------- factory


def make_tasks(shard_dir: str | Path, part: str, spec: TaskSpec, *, seed: int,
               mode: str = "memory", verify: bool = True, tasks_per_batch: int | None = None,
               batches: int | None = None, rank: int | None = None, world: int | None = None,
               shuffle_buffer: int = 256, memory_budget_gb: float = DataConfig.memory_budget_gb
               ) -> MemoryTasks | StreamTasks:
    """Open one part of a shard set as a task sampler; all checks happen here, before training.

    ``memory``: loads (and verifies) the part's classes and returns ``MemoryTasks``; a part
    holding more than ``memory_budget_gb`` of images is refused before loading.
    ``stream``: verifies the part's shards and returns ``StreamTasks`` (needs ``tasks_per_batch``
    and ``batches``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    shard_dir = Path(shard_dir)
    if mode == "memory":
        manifest = shardlib.load_manifest(shard_dir)
        shardlib.check_part(manifest, part, shard_dir)
        problem = shardlib.memory_budget_problem(manifest, [part], memory_budget_gb, shard_dir)
        if problem:
            raise ValueError(problem)
        return MemoryTasks(shardlib.load_class_pool(shard_dir, part, verify=verify), spec, seed)
    if tasks_per_batch is None or batches is None:
        raise ValueError("stream mode needs tasks_per_batch (this rank's share of the meta-batch) "
                         "and batches (meta-batches per epoch)")
    manifest = (shardlib.verify_shards(shard_dir, [part]) if verify
                else shardlib.load_manifest(shard_dir))
    entry = shardlib.check_part(manifest, part, shard_dir)
    check_augment_channels(spec, manifest["channels"], f"part {part!r} of {shard_dir}")
    counts = shardlib.images_per_class(manifest, part)
    files, start = [], 0
    for shard in entry["shards"]:  # count per shard only the classes a task can use
        in_shard = counts[start:start + shard["classes"]]
        files.append((shard_dir / shard["file"],
                      shardlib.classes_with_at_least(in_shard, spec.images_per_class)))
        start += shard["classes"]
    return StreamTasks(files, spec, counts=counts, seed=seed,
                       tasks_per_batch=tasks_per_batch, batches=batches, rank=rank, world=world,
                       shuffle_buffer=shuffle_buffer, where=f"part {part!r} of {shard_dir}")
