"""Pack the standard few-shot benchmarks from local copies of their usual layouts (no download).

=================  ========================================================  ===============
name               layout under ROOT                                         classes
=================  ========================================================  ===============
``miniimagenet``   ``images/`` + ``train.csv``, ``val.csv``, ``test.csv``    64 / 16 / 20
                   (Ravi & Larochelle; header ``filename,label``)            x 600 images
``tieredimagenet`` ``train/``, ``val/``, ``test/`` of class folders          351 / 97 / 160
``cifarfs``        ``train/``, ``val/``, ``test/`` of class folders (32x32)  64 / 16 / 20
``fc100``          ``train/``, ``val/``, ``test/`` of class folders (32x32)  60 / 20 / 20
``cub``            ``images/<class folder>/*.jpg`` (CUB-200-2011)            100 / 50 / 50
=================  ========================================================  ===============

CUB's split is the one of Chen et al. 2019, "A Closer Look at Few-shot Classification"
(``filelists/CUB/write_CUB_filelist.py`` of github.com/wyharveychen/CloserLookFewShot): class
folders sorted by name (= by their numeric prefix), index i in train when i % 2 == 0, val when
i % 4 == 1, test when i % 4 == 3. It ships as ``splits/cub_100_50_50.json``.

Images go through the folder packer's reading, resize and channel policy and its atomic,
reproducible writing (``folder.pack_classes``). Before anything is decoded, the classes per part
(and mini-ImageNet's images per class) are checked against the benchmark's known counts; a
mismatch names the part and the numbers. ``expected`` replaces the known counts, for small
synthetic copies in tests; the command line always checks the real ones.

Example::

    pack_benchmark("miniimagenet", "data/mini-imagenet", "shards/miniimagenet")
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fsl_dist.data import folder, shards
from fsl_dist.data.folder import FolderClass, FolderSourceError

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
CUB_SPLIT = SPLITS_DIR / "cub_100_50_50.json"


@dataclass(frozen=True)
class Benchmark:
    name: str
    classes: dict[str, int]  # part -> classes it must hold
    images_per_class: int | None  # every class must hold exactly this many, or None
    size: int  # default image side
    layout: str  # what ROOT must hold, for the error messages
    published: str  # where the data set (and its split) is published


BENCHMARKS = {
    "miniimagenet": Benchmark(
        "miniimagenet", {"train": 64, "val": 16, "test": 20}, 600, 84,
        "ROOT/images/<filename> and ROOT/train.csv, val.csv, test.csv (header filename,label)",
        "the split CSVs of Ravi & Larochelle 2017, github.com/twitter/meta-learning-lstm "
        "(data/miniImagenet), over ImageNet images (image-net.org)"),
    "tieredimagenet": Benchmark(
        "tieredimagenet", {"train": 351, "val": 97, "test": 160}, None, 84,
        "ROOT/train/<class>/<image>, ROOT/val/<class>/<image>, ROOT/test/<class>/<image>",
        "Ren et al. 2018, github.com/renmengye/few-shot-ssl-public (over ImageNet images)"),
    "cifarfs": Benchmark(
        "cifarfs", {"train": 64, "val": 16, "test": 20}, None, 32,
        "ROOT/train/<class>/*.png, ROOT/val/<class>/*.png, ROOT/test/<class>/*.png",
        "Bertinetto et al. 2019, github.com/bertinetto/r2d2 (over CIFAR-100)"),
    "fc100": Benchmark(
        "fc100", {"train": 60, "val": 20, "test": 20}, None, 32,
        "ROOT/train/<class>/*.png, ROOT/val/<class>/*.png, ROOT/test/<class>/*.png",
        "Oreshkin et al. 2018, github.com/ElementAI/TADAM (over CIFAR-100)"),
    "cub": Benchmark(
        "cub", {"train": 100, "val": 50, "test": 50}, None, 84,
        "ROOT/images/<class folder>/*.jpg (CUB_200_2011/images, e.g. 001.Black_footed_Albatross)",
        "CUB-200-2011, www.vision.caltech.edu/datasets/cub_200_2011"),
}
PART_FOLDER_LAYOUTS = ("tieredimagenet", "cifarfs", "fc100")


class BenchmarkSourceError(FolderSourceError):
    """A benchmark copy lacks files or holds other counts than the benchmark; the message says
    what is expected and where the data set is published."""


# ----------------------------------------------------------------------------- packing


def pack_benchmark(name: str, root: str | Path, out_dir: str | Path, *, size: int | None = None,
                   channels: int | None = 3, expected: dict | None = None,
                   classes_per_shard: int = shards.DEFAULT_CLASSES_PER_SHARD,
                   quiet: bool = False) -> Path:
    """Pack the benchmark ``name`` from its copy at ``root`` into a shard set at ``out_dir``.

    ``size`` defaults to the benchmark's (84, or 32 for CIFAR-FS and FC100); ``channels`` 3
    converts every image to RGB (a few ImageNet and CUB images are grayscale or CMYK).

    ``expected`` ({"classes": {part: n}, "images_per_class": n or None}) replaces the
    benchmark's known counts: for small synthetic copies in tests, never for real data.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    benchmark = BENCHMARKS[name]
    root = Path(root)
    size = benchmark.size if size is None else size
    folder.check_image_options(size, channels, classes_per_shard, seed=0)
    shards.check_destination(out_dir, root)
    if name == "miniimagenet":
        classes, parts, split_source = list_miniimagenet(root, benchmark)
    elif name == "cub":
        classes, parts, split_source = list_cub(root, benchmark)
    else:
        classes, parts, split_source = list_part_folders(root, benchmark)
    check_counts(benchmark, classes, parts, root, expected)
    return folder.pack_classes(classes, parts, out_dir, dataset=name, split_source=split_source,
                               where=root, size=size, channels=channels, seed=0,
                               classes_per_shard=classes_per_shard, quiet=quiet)  # fixed split


def check_counts(benchmark: Benchmark, classes: list[FolderClass], parts: dict[str, list[str]],
                 root: Path, expected: dict | None) -> None:
    """Classes per part and images per class against the benchmark's (or ``expected``) counts."""
    expected = expected or {"classes": benchmark.classes,
                            "images_per_class": benchmark.images_per_class}
    for part in shards.PARTS:
        want, found = expected["classes"][part], len(parts[part])
        if found != want:
            raise _source_error(benchmark, root, f"part {part!r} holds {found} classes, "
                                f"{benchmark.name} has {want}")
    per_class = expected.get("images_per_class")
    by_name = {c.name: c for c in classes}
    for part in shards.PARTS:
        for name in parts[part]:
            found = len(by_name[name].files)
            if per_class is not None and found != per_class:
                raise _source_error(benchmark, root, f"class {name!r} of part {part!r} holds "
                                    f"{found} images, {benchmark.name} has {per_class}")


def _source_error(benchmark: Benchmark, root: Path, what: str) -> BenchmarkSourceError:
    return BenchmarkSourceError(f"{benchmark.name} at {root}: {what}; expected "
                                f"{benchmark.layout}, as published by {benchmark.published}")


def _require(benchmark: Benchmark, root: Path, paths: list[Path]) -> None:
    """Name every missing file or folder of the layout at once."""
    missing = [str(path.relative_to(root)) for path in paths if not path.exists()]
    if missing:
        raise _source_error(benchmark, root, f"missing {', '.join(missing)}")


# ----------------------------------------------------------------------------- layouts


def list_part_folders(root: Path, benchmark: Benchmark):
    """ROOT/<part>/<class>/<image>: classes, parts and the split source of a folder layout."""
    _require(benchmark, root, [root / part for part in shards.PARTS])
    classes, parts, placed = [], {}, {}
    for part in shards.PARTS:
        part_classes = folder.list_classes(root / part)
        for folder_class in part_classes:
            if folder_class.name in placed:
                raise _source_error(benchmark, root, f"class {folder_class.name!r} is in "
                                    f"{placed[folder_class.name]} and in {part}")
            placed[folder_class.name] = part
        classes += part_classes
        parts[part] = [c.name for c in part_classes]
    split_source = {"kind": "folders", "folders": list(shards.PARTS)}
    return classes, parts, split_source


def list_miniimagenet(root: Path, benchmark: Benchmark):
    """ROOT/images + the three split CSVs: classes (by label), parts and the split source."""
    csv_files = [root / f"{part}.csv" for part in shards.PARTS]
    _require(benchmark, root, [root / "images", *csv_files])
    files: dict[str, list[Path]] = {}
    parts: dict[str, list[str]] = {}
    for part, csv_file in zip(shards.PARTS, csv_files):
        rows = read_label_csv(csv_file, benchmark, root)
        for filename, label in rows:
            files.setdefault(label, []).append(root / "images" / filename)
        parts[part] = sorted({label for _, label in rows})
    _require_disjoint(parts, benchmark, root)
    missing = [path for paths in files.values() for path in paths if not path.is_file()]
    if missing:
        raise _source_error(benchmark, root, f"{len(missing)} images the CSVs name are missing "
                            f"from images/, e.g. {missing[0].name}")
    classes = [FolderClass(label, tuple(sorted(files[label]))) for label in sorted(files)]
    split_source = {"kind": "csv", "files": [path.name for path in csv_files],
                    "sha256": {path.name: _sha256(path) for path in csv_files}}
    return classes, parts, split_source


def read_label_csv(path: Path, benchmark: Benchmark, root: Path) -> list[tuple[str, str]]:
    """(filename, label) rows of one split CSV (header ``filename,label``)."""
    rows = list(csv.reader(path.read_text().splitlines()))
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        raise _source_error(benchmark, root, f"{path.name} does not start with the header "
                            "filename,label")
    pairs = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise _source_error(benchmark, root, f"{path.name} line {line} is {row!r}, not "
                                "filename,label")
        pairs.append((row[0].strip(), row[1].strip()))
    return pairs


def _require_disjoint(parts: dict[str, list[str]], benchmark: Benchmark, root: Path) -> None:
    placed: dict[str, str] = {}
    for part, names in parts.items():
        for name in names:
            if name in placed:
                raise _source_error(benchmark, root, f"class {name!r} is in {placed[name]} and "
                                    f"in {part}")
            placed[name] = part


def list_cub(root: Path, benchmark: Benchmark):
    """ROOT/images/<class folder> with the shipped 100/50/50 split: classes, parts, source."""
    images = root / "images"
    _require(benchmark, root, [images])
    classes = folder.list_classes(images)
    pairs = folder.read_split_file(CUB_SPLIT)
    names = {c.name for c in classes}
    missing = [name for name, _ in pairs if name not in names]
    if missing:
        raise _source_error(benchmark, root, f"{len(missing)} of the {len(pairs)} class folders "
                            f"of the split are missing from images/, e.g. {missing[0]}")
    parts = folder.split_from_file(CUB_SPLIT, names, images)
    split_source = {"kind": "file", "file": CUB_SPLIT.name, "sha256": _sha256(CUB_SPLIT),
                    "rule": "Chen et al. 2019: sorted class folders, train i%2==0, "
                            "val i%4==1, test i%4==3"}
    return classes, parts, split_source


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
