"""launch/bench_data.py in memory and stream mode on a tiny RGB shard set."""

import numpy as np
import pytest

from fsl_dist.bench import data
from fsl_dist.data import shards


@pytest.fixture(scope="module")
def rgb_set(tmp_path_factory):
    parts, next_id = {}, 0
    for part in shards.PARTS:
        parts[part] = []
        for _ in range(6):
            parts[part].append(shards.ClassEntry(
                f"c{next_id:05d}", {"id": next_id},
                lambda s=next_id: np.random.default_rng(s).integers(
                    0, 256, (6, 3, 12, 12), dtype=np.uint8)))
            next_id += 1
    header = {"dataset": "folder", "channels": 3, "image_size": 12, "rotate": False,
              "split_source": {"kind": "test"}}
    return shards.write_shard_set(tmp_path_factory.mktemp("rgb") / "set", parts, header,
                                  classes_per_shard=4)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_both_modes_report_a_rate_with_and_without_augmentation(rgb_set, mode, capsys):
    data.main(["--shards", str(rgb_set), "--mode", mode, "--tasks", "3w1s2q", "3w2s2q",
               "--tasks-per-batch", "2", "--seconds", "0.05", "--no-rotate",
               "--augment", "none", "lee2019"])
    out = capsys.readouterr().out
    assert f"{mode} mode" in out and "(3, 12, 12)" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 3-way")]
    assert [r[3].strip() for r in rows] == ["none", "lee2019"] * 2
    assert all(int(r[6]) >= 1 for r in rows)
