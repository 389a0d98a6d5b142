"""Bad input fails early with an error that names the file or value and the fix."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsl_dist.data import episodes, shards
from fsl_dist.data.episodes import TaskSpec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shard_copy(packed, tmp_path):
    """A private copy of the futurama shard set, free to damage."""
    return shutil.copytree(packed("futurama"), tmp_path / "omniglot-futurama")


# Every entry point that must refuse a damaged set, one test each.
OPENERS = {
    "verify_shards": lambda d: shards.verify_shards(d),
    "load_class_pool": lambda d: shards.load_class_pool(d, "train"),
    "memory_tasks": lambda d: episodes.make_tasks(d, "train", TaskSpec(5, 1, 1), seed=0),
    "stream_tasks": lambda d: episodes.make_tasks(d, "train", TaskSpec(5, 1, 1), seed=0,
                                                  mode="stream", tasks_per_batch=2, batches=1),
}
each_opener = pytest.mark.parametrize("opener", OPENERS.values(), ids=list(OPENERS))


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@each_opener
def test_truncated_shard_is_named(shard_copy, opener):
    victim = shard_copy / "train-000003.tar"
    victim.write_bytes(victim.read_bytes()[:5000])
    with pytest.raises(shards.ShardError,
                       match=r"train-000003\.tar is truncated .*launch/pack\.py"):
        opener(shard_copy)


@each_opener
def test_flipped_byte_is_named(shard_copy, opener):
    flip_a_byte(shard_copy / "train-000005.tar")
    with pytest.raises(shards.ShardError, match=r"train-000005\.tar fails its SHA-256 check"):
        opener(shard_copy)


def test_other_parts_stay_usable_beside_a_damaged_shard(shard_copy):
    flip_a_byte(shard_copy / "train-000005.tar")
    shards.load_class_pool(shard_copy, "test")


def test_missing_shard_is_named(shard_copy):
    (shard_copy / "val-000001.tar").unlink()
    with pytest.raises(shards.ShardError, match=r"val-000001\.tar is missing"):
        shards.load_class_pool(shard_copy, "val")


@each_opener
def test_missing_manifest_is_named(shard_copy, opener):
    (shard_copy / "manifest.json").unlink()
    with pytest.raises(shards.ShardError,
                       match=r"has no manifest\.json; re-pack it: python launch/pack\.py"):
        opener(shard_copy)


def test_never_packed_folder_is_named(tmp_path):
    with pytest.raises(shards.ShardError, match="does not exist"):
        shards.load_manifest(tmp_path / "never-packed")


def test_unknown_part_is_named(packed):
    with pytest.raises(ValueError, match="unknown part 'dev'.*test, train, val"):
        shards.load_class_pool(packed("futurama"), "dev")


def test_unknown_mode_is_named(packed):
    with pytest.raises(ValueError, match="unknown mode 'disk'"):
        episodes.make_tasks(packed("futurama"), "train", TaskSpec(5, 1, 1), seed=0, mode="disk")


def test_unknown_split_is_named(packed):
    out = packed("futurama")
    with pytest.raises(ValueError, match="unknown split 'omniglot-v2'"):
        shards.pack_omniglot(None, "omniglot-v2", out.parent / "x", download=False)


each_mode = pytest.mark.parametrize("mode", ["memory", "stream"])


def make_tasks_of(packed, mode, part, spec):
    return episodes.make_tasks(packed("futurama"), part, spec, seed=0, mode=mode,
                               tasks_per_batch=2, batches=1)


@each_mode
def test_more_ways_than_classes_is_refused_before_training(packed, mode):
    with pytest.raises(ValueError,
                       match=r"27-way tasks need 27 classes but part 'test' .* has only 26"):
        make_tasks_of(packed, mode, "test", TaskSpec(27, 1, 1))


@each_mode
def test_more_shots_than_drawings_is_refused_before_training(packed, mode):
    with pytest.raises(ValueError, match=r"k_shot \+ q_query = 5 \+ 16 = 21 exceeds the 20 "
                                         r"images per class.*at most 15"):
        make_tasks_of(packed, mode, "train", TaskSpec(5, 5, 16))


@each_mode
def test_tasks_exactly_at_both_limits_are_fine(packed, mode):
    make_tasks_of(packed, mode, "test", TaskSpec(26, 5, 15))


@pytest.mark.parametrize("make, message", [
    (lambda: TaskSpec(0, 1, 1), "TaskSpec.n_way must be a positive integer"),
    (lambda: TaskSpec(5, 1, 1.5), "TaskSpec.q_query"),
    (lambda: episodes.rank_slice(32, 0, 3), "do not divide among 3 processes"),
    (lambda: episodes.rank_slice(32, 4, 4), "rank 4 is outside 0..3"),
], ids=["n_way-0", "q_query-1.5", "32-tasks-3-ranks", "rank-4-of-4"])
def test_bad_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.integration
def test_killed_pack_leaves_earlier_set_intact(packed, omniglot_source, tmp_path):
    """SIGKILL a real pack midway: the earlier set is untouched and no partial set is in place."""
    dest = shutil.copytree(packed("futurama"), tmp_path / "omniglot-futurama")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    command = [sys.executable, str(REPO / "launch" / "pack.py"), "omniglot", "--source",
               str(omniglot_source), "--split", "futurama", "--out", str(dest),
               "--classes-per-shard", "1",  # 1 class per shard: ~1000 files to write
               "--no-download"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        staging = _wait_for_partial_staging(tmp_path, process, min_shards=3, timeout=120)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (staging / shards.MANIFEST).exists()  # it really was killed midway
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    shards.verify_shards(dest)
    # The next pack replaces the set and clears the dead pack's staging folder.
    shards.pack_omniglot(omniglot_source, "futurama", dest, download=False)
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]


def _wait_for_partial_staging(parent, process, *, min_shards, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for staging in parent.glob(".omniglot-futurama.tmp-*"):
            if len(list(staging.glob("*.tar"))) >= min_shards:
                return staging
        if process.poll() is not None:
            pytest.fail(f"pack ended before it could be killed: {process.stdout.read().decode()}")
        time.sleep(0.02)
    pytest.fail("no staging folder with shards appeared")
