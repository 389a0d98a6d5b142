"""The benchmark packers on tiny synthetic copies of each layout (expected counts passed
explicitly): packing, manifest, tasks, count mismatches, missing files, the shipped CUB split."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fsl_dist.config import Config, validate
from fsl_dist.data import benchmarks, episodes, pack_cli, shards
from fsl_dist.data.episodes import TaskSpec
from fsl_dist.runs import ensure_shards

REPO = Path(__file__).resolve().parents[1]

SIZE = 8
IMAGES = 3  # per class
SMALL = {"train": 3, "val": 2, "test": 2}  # classes per part of the synthetic copies
FOLDER_LAYOUTS = benchmarks.PART_FOLDER_LAYOUTS
# what ensure_shards needs of the distributed layer, for one process
ONE_PROCESS = SimpleNamespace(is_main=True, print=print, broadcast_object=lambda value: value)


def save_images(rng, paths):
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(path)


def write_part_folders(root, rng):
    for part, count in SMALL.items():
        save_images(rng, [root / part / f"{part}-class{c}" / f"{i}.png"
                          for c in range(count) for i in range(IMAGES)])
    return root


def write_miniimagenet(root, rng):
    for part, count in SMALL.items():
        rows = [(f"n{part}{c:02d}{i:08d}.jpg", f"n{part}{c:02d}")
                for c in range(count) for i in range(IMAGES)]
        save_images(rng, [root / "images" / name for name, _ in rows])
        lines = ["filename,label"] + [f"{name},{label}" for name, label in rows]
        (root / f"{part}.csv").write_text("\n".join(lines) + "\n")
    return root


def write_cub(root, rng):
    """All 200 class folders of the shipped split, two tiny images each."""
    split = json.loads(benchmarks.CUB_SPLIT.read_text())
    names = sorted(sum(split.values(), []))
    save_images(rng, [root / "images" / name / f"{i}.jpg" for name in names for i in range(2)])
    return root


def small_expected(name):
    if name == "cub":
        return None  # the real 100/50/50: the synthetic copy has every class folder
    return {"classes": SMALL, "images_per_class": IMAGES}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """name -> root of a synthetic copy of that layout."""
    rng = np.random.default_rng(0)
    base = tmp_path_factory.mktemp("benchmarks")
    made = {name: write_part_folders(base / name, rng) for name in FOLDER_LAYOUTS}
    made["miniimagenet"] = write_miniimagenet(base / "miniimagenet", rng)
    made["cub"] = write_cub(base / "cub", rng)
    return made


@pytest.fixture(scope="module")
def packed(copies, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    return {name: benchmarks.pack_benchmark(name, root, out / name, size=SIZE,
                                            expected=small_expected(name), quiet=True)
            for name, root in copies.items()}


@pytest.mark.parametrize("name", list(benchmarks.BENCHMARKS))
def test_each_layout_packs_verifies_and_samples_tasks(packed, name):
    manifest = shards.verify_shards(packed[name])
    assert manifest["dataset"] == name and manifest["rotate"] is False
    assert manifest["channels"] == 3 and manifest["image_size"] == SIZE
    tasks = episodes.make_tasks(packed[name], "train", TaskSpec(2, 1, 1), seed=0)
    assert tasks.batch(0, range(2))["support_x"].shape == (2, 2, 3, SIZE, SIZE)


@pytest.mark.parametrize("name", list(benchmarks.BENCHMARKS))
def test_the_manifest_records_the_split_source_and_counts(packed, name):
    manifest = shards.load_manifest(packed[name])
    classes = benchmarks.BENCHMARKS["cub"].classes if name == "cub" else SMALL
    per_class = 2 if name == "cub" else IMAGES
    for part in shards.PARTS:
        assert manifest["splits"][part]["classes"] == classes[part]
        assert manifest["splits"][part]["images_per_class"] == [per_class] * classes[part]
    source = manifest["split_source"]
    if name == "miniimagenet":
        assert source["kind"] == "csv" and source["files"] == ["train.csv", "val.csv", "test.csv"]
        assert set(source["sha256"]) == set(source["files"])
    elif name == "cub":
        assert source["kind"] == "file" and source["file"] == "cub_100_50_50.json"
    else:
        assert source == {"kind": "folders", "folders": ["train", "val", "test"]}


def test_cub_parts_follow_the_shipped_split(packed):
    split = json.loads(benchmarks.CUB_SPLIT.read_text())
    for part in shards.PARTS:
        names = [c["name"] for c in shards.load_class_pool(packed["cub"], part).classes]
        assert names == split[part]


def test_the_shipped_cub_split_is_100_50_50_distinct_classes_by_the_closer_look_rule():
    split = json.loads(benchmarks.CUB_SPLIT.read_text())
    assert {part: len(set(names)) for part, names in split.items()} == {
        "train": 100, "val": 50, "test": 50}
    every = sorted(sum(split.values(), []))
    assert len(set(every)) == 200
    assert [int(name.split(".")[0]) for name in every] == list(range(1, 201))
    assert split["train"] == [n for i, n in enumerate(every) if i % 2 == 0]
    assert split["val"] == [n for i, n in enumerate(every) if i % 4 == 1]
    assert split["test"] == [n for i, n in enumerate(every) if i % 4 == 3]


@pytest.mark.parametrize("name, expected, message", [
    ("tieredimagenet", {"classes": {**SMALL, "val": 5}},
     r"tieredimagenet at .*: part 'val' holds 2 classes, tieredimagenet has 5"),
    ("miniimagenet", {"classes": SMALL, "images_per_class": 600},
     r"class 'ntrain00' of part 'train' holds 3 images, miniimagenet has 600"),
    ("cub", {"classes": {"train": 100, "val": 50, "test": 49}},
     r"part 'test' holds 50 classes, cub has 49"),
])
def test_a_count_mismatch_names_the_part_and_the_numbers(copies, tmp_path, name, expected,
                                                         message):
    with pytest.raises(benchmarks.BenchmarkSourceError, match=message):
        benchmarks.pack_benchmark(name, copies[name], tmp_path / "out", size=SIZE,
                                  expected=expected, quiet=True)
    assert not (tmp_path / "out").exists()


def test_the_command_line_checks_the_real_counts(copies, tmp_path, capsys):
    code = pack_cli.main(["cifarfs", str(copies["cifarfs"]), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert "part 'train' holds 3 classes, cifarfs has 64" in error
    assert "github.com/bertinetto/r2d2" in error


@pytest.mark.parametrize("name, missing, published", [
    ("miniimagenet", "images, train.csv, val.csv, test.csv", "twitter/meta-learning-lstm"),
    ("tieredimagenet", "train, val, test", "renmengye/few-shot-ssl-public"),
    ("cifarfs", "train, val, test", "bertinetto/r2d2"),
    ("fc100", "train, val, test", "ElementAI/TADAM"),
    ("cub", "images", "cub_200_2011"),
])
def test_missing_files_are_named_with_where_the_data_set_is_published(tmp_path, name, missing,
                                                                      published):
    (tmp_path / "empty").mkdir()
    with pytest.raises(benchmarks.BenchmarkSourceError) as caught:
        benchmarks.pack_benchmark(name, tmp_path / "empty", tmp_path / "out", quiet=True)
    text = str(caught.value)
    assert f"missing {missing};" in text and published in text
    assert benchmarks.BENCHMARKS[name].layout in text


def test_missing_images_and_class_folders_are_counted(copies, tmp_path):
    mini = shutil.copytree(copies["miniimagenet"], tmp_path / "mini")
    (mini / "images" / "nval0100000002.jpg").unlink()
    with pytest.raises(benchmarks.BenchmarkSourceError,
                       match=r"1 images the CSVs name are missing from images/, "
                             r"e\.g\. nval0100000002\.jpg"):
        benchmarks.pack_benchmark("miniimagenet", mini, tmp_path / "out", quiet=True,
                                  expected=small_expected("miniimagenet"))
    cub = shutil.copytree(copies["cub"], tmp_path / "cub")
    shutil.rmtree(cub / "images" / "200.Common_Yellowthroat")
    with pytest.raises(benchmarks.BenchmarkSourceError,
                       match=r"1 of the 200 class folders of the split are missing from images/, "
                             r"e\.g\. 200\.Common_Yellowthroat"):
        benchmarks.pack_benchmark("cub", cub, tmp_path / "out", quiet=True)


@pytest.mark.integration
@pytest.mark.parametrize("name", list(benchmarks.BENCHMARKS))
def test_pack_subcommand_help_runs(name):
    result = subprocess.run([sys.executable, str(REPO / "launch" / "pack.py"), name, "--help"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert benchmarks.BENCHMARKS[name].published.split(",")[0] in " ".join(result.stdout.split())


def test_a_damaged_benchmark_set_names_its_own_repack_command(packed, tmp_path):
    damaged = shutil.copytree(packed["fc100"], tmp_path / "fc100")
    shard = shards.shard_files(damaged, "val")[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(shards.ShardError,
                       match=r"re-pack it: python launch/pack.py fc100 ROOT --out "):
        shards.verify_shards(damaged)


def test_training_takes_a_benchmark_set_and_names_its_pack_command_when_missing(packed,
                                                                               tmp_path):
    cfg = Config()
    cfg.data.shards, cfg.data.dataset, cfg.data.rotate = str(packed["cub"]), "cub", False
    cfg.task.n_way, cfg.task.k_shot, cfg.task.q_query = 3, 1, 1
    validate(cfg)
    assert ensure_shards(cfg, ONE_PROCESS)["dataset"] == "cub"
    cfg.data.shards = str(tmp_path / "nowhere")
    with pytest.raises(shards.ShardError, match=r"python launch/pack.py cub ROOT --out .*nowhere"):
        ensure_shards(cfg, ONE_PROCESS)
