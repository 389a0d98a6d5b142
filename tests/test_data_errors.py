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


def open_all_ways(shard_dir, part="train"):
    """Every entry point that must refuse a damaged set."""
    yield lambda: shards.verify_shards(shard_dir)
    yield lambda: shards.load_class_pool(shard_dir, part)
    yield lambda: episodes.make_tasks(shard_dir, part, TaskSpec(5, 1, 1), seed=0)
    yield lambda: episodes.make_tasks(shard_dir, part, TaskSpec(5, 1, 1), seed=0, mode="stream",
                                      tasks_per_batch=2, batches=1)


def test_truncated_shard_is_named(shard_copy):
    victim = shard_copy / "train-000003.tar"
    victim.write_bytes(victim.read_bytes()[:5000])
    for attempt in open_all_ways(shard_copy):
        with pytest.raises(shards.ShardError, match=r"train-000003\.tar is truncated .*launch/pack\.py"):
            attempt()


def test_flipped_byte_is_named(shard_copy):
    victim = shard_copy / "train-000005.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    for attempt in open_all_ways(shard_copy):
        with pytest.raises(shards.ShardError, match=r"train-000005\.tar fails its SHA-256 check"):
            attempt()
    shards.load_class_pool(shard_copy, "test")  # other parts are still usable


def test_missing_shard_and_manifest(shard_copy, tmp_path):
    (shard_copy / "val-000001.tar").unlink()
    with pytest.raises(shards.ShardError, match=r"val-000001\.tar is missing"):
        shards.load_class_pool(shard_copy, "val")
    (shard_copy / "manifest.json").unlink()
    for attempt in open_all_ways(shard_copy):
        with pytest.raises(shards.ShardError, match=r"has no manifest\.json; re-pack it: python launch/pack\.py"):
            attempt()
    with pytest.raises(shards.ShardError, match="does not exist"):
        shards.load_manifest(tmp_path / "never-packed")


def test_unknown_part_mode_and_split(packed):
    out = packed("futurama")
    with pytest.raises(ValueError, match="unknown part 'dev'.*test, train, val"):
        shards.load_class_pool(out, "dev")
    with pytest.raises(ValueError, match="unknown mode 'disk'"):
        episodes.make_tasks(out, "train", TaskSpec(5, 1, 1), seed=0, mode="disk")
    with pytest.raises(ValueError, match="unknown split 'omniglot-v2'"):
        shards.pack_omniglot(None, "omniglot-v2", out.parent / "x", download=False)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_task_shape_checked_before_training(packed, mode):
    out = packed("futurama")
    kw = dict(seed=0, mode=mode, tasks_per_batch=2, batches=1)
    with pytest.raises(ValueError, match=r"27-way tasks need 27 classes but part 'test' .* has only 26"):
        episodes.make_tasks(out, "test", TaskSpec(27, 1, 1), **kw)
    with pytest.raises(ValueError, match=r"k_shot \+ q_query = 5 \+ 16 = 21 exceeds the 20 drawings.*at most 15"):
        episodes.make_tasks(out, "train", TaskSpec(5, 5, 16), **kw)
    episodes.make_tasks(out, "test", TaskSpec(26, 5, 15), **kw)  # exactly at both limits is fine


def test_bad_values():
    with pytest.raises(ValueError, match="TaskSpec.n_way must be a positive integer"):
        TaskSpec(0, 1, 1)
    with pytest.raises(ValueError, match="TaskSpec.q_query"):
        TaskSpec(5, 1, 1.5)
    with pytest.raises(ValueError, match="do not divide among 3 processes"):
        episodes.rank_slice(32, 0, 3)
    with pytest.raises(ValueError, match="rank 4 is outside 0..3"):
        episodes.rank_slice(32, 4, 4)


@pytest.mark.integration
def test_killed_pack_leaves_earlier_set_intact(packed, omniglot_source, tmp_path):
    """SIGKILL a real pack midway: the earlier set is untouched and no partial set is in place."""
    dest = shutil.copytree(packed("futurama"), tmp_path / "omniglot-futurama")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    command = [sys.executable, str(REPO / "launch" / "pack.py"), "omniglot", "--source",
               str(omniglot_source), "--split", "futurama", "--out", str(dest),
               "--classes-per-shard", "1", "--no-download"]  # 1 class per shard: ~1000 files to write
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
