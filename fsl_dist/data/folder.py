"""Pack an image folder, the ImageFolder layout ``ROOT/<class>/<image>``, into a shard set.

Every file in a class folder is an image (any format Pillow opens), but for hidden files and
folders (names starting with a dot: ``.DS_Store``, AppleDouble ``._*``) and what operating
systems leave in folders (``Thumbs.db``, ``desktop.ini``, ``__MACOSX/``: ``shards.OS_JUNK``),
which are ignored (``ignored``), as are files directly in ROOT.

- **Size**: the shorter side is resized to ``size`` (bilinear, antialiased when shrinking), then
  the centre ``size`` x ``size`` square is cropped; images smaller than ``size`` are enlarged.
- **Channels**: ``channels=1`` converts every image to grayscale (L), ``3`` to RGB. Transparent
  images (RGBA, LA, palette with transparency) are first composited onto white; 16-bit
  grayscale is scaled to 8 bits. Without ``channels``, the images must agree (grayscale modes
  1, L, LA, I, F count as 1 channel, all others as 3), else the error names one of each.
- **Split**: a split file (JSON ``{"train": [classes], "val": [...], "test": [...]}`` or CSV
  rows ``class,part``; classes it does not name are left out), or seeded class fractions (by
  default 0.64 / 0.16 / 0.20, the mini-ImageNet proportions). Classes are sorted by name first,
  so the same folder, fractions and seed give the same split everywhere.

Images are not inverted or normalised: tasks see them as float in [0, 1]. Rotation is not
meaningful for natural images, so the manifest marks it off (``"rotate": false``).

Example::

    pack_folder("data/my-images", "shards/my-folder", size=84, channels=3)
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fsl_dist.data import shards
from fsl_dist.progress import progress

DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)
DEFAULT_SIZE = 84
ONE_CHANNEL_MODES = ("1", "L", "LA", "La", "I", "F")  # and the I;16 variants
WHITE = (255, 255, 255, 255)


class FolderSourceError(ValueError):
    """The image folder or split file cannot be packed as given; the message names the fix."""


@dataclass(frozen=True)
class FolderClass:
    name: str
    files: tuple[Path, ...]


# ----------------------------------------------------------------------------- listing


def list_classes(root: Path) -> list[FolderClass]:
    """Class folders of ``root`` sorted by name, each with its image files sorted by name."""
    if not root.is_dir():
        raise FolderSourceError(f"image folder {root} does not exist; pass the folder holding "
                                "one folder per class (ROOT/<class>/<image>)")
    classes = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not ignored(p)):
        files = tuple(sorted(p for p in folder.iterdir() if p.is_file() and not ignored(p)))
        if not files:
            raise FolderSourceError(f"class folder {folder} holds no images; add images to it "
                                    "or remove it")
        classes.append(FolderClass(folder.name, files))
    if not classes:
        raise FolderSourceError(f"{root} holds no class folders; lay it out as "
                                "ROOT/<class>/<image>")
    return classes


def ignored(path: Path) -> bool:
    """Hidden (a leading dot) or left by an operating system: never a class or an image."""
    return path.name.startswith(".") or shards.is_os_junk(path.name)


# ----------------------------------------------------------------------------- splits


def read_split_file(path: Path) -> list[tuple[str, str]]:
    """(class, part) pairs of a JSON or CSV split file, in file order."""
    if not path.is_file():
        raise FolderSourceError(f"split file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            parts = json.loads(text)
        except json.JSONDecodeError as error:
            raise FolderSourceError(f"split file {path} is not valid JSON ({error})") from error
        if not isinstance(parts, dict) or not all(isinstance(v, list) for v in parts.values()):
            raise FolderSourceError(f"split file {path} must map parts to lists of classes: "
                                    '{"train": [...], "val": [...], "test": [...]}')
        return [(str(name), part) for part, names in parts.items() for name in names]
    pairs = []
    for line, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or (line == 1 and cells == ["class", "part"]):
            continue
        if len(cells) != 2:
            raise FolderSourceError(f"split file {path} line {line} is {row!r}; each row must be "
                                    "class,part")
        pairs.append((cells[0], cells[1]))
    return pairs


def split_from_file(path: Path, names: set[str], root: Path) -> dict[str, list[str]]:
    """Parts named by a split file, checked against the class folders of ``root``."""
    parts: dict[str, list[str]] = {part: [] for part in shards.PARTS}
    placed: dict[str, str] = {}
    for name, part in read_split_file(path):
        if part not in parts:
            raise FolderSourceError(f"split file {path} names part {part!r}; parts are "
                                    f"{', '.join(shards.PARTS)}")
        if name in placed:
            raise FolderSourceError(f"split file {path} puts class {name!r} in {placed[name]} "
                                    f"and in {part}; each class belongs to one part")
        if name not in names:
            raise FolderSourceError(f"split file {path} names class {name!r} ({part}) but "
                                    f"{root} has no folder {name!r}; fix the name or add it")
        placed[name] = part
        parts[part].append(name)
    _require_every_part(parts, f"split file {path}")
    return {part: sorted(members) for part, members in parts.items()}


def split_by_fractions(names: list[str], fractions, seed: int) -> dict[str, list[str]]:
    """Seeded train/val/test of ``names`` (sorted first) in the given proportions."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise FolderSourceError(f"fractions {fractions} must be three non-negative numbers "
                                "(train, val, test) that sum to 1, e.g. 0.64,0.16,0.20")
    ordered = sorted(names)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    train = round(fractions[0] * len(ordered))
    val = round(fractions[1] * len(ordered))
    cut = {"train": shuffled[:train], "val": shuffled[train:train + val],
           "test": shuffled[train + val:]}
    sizes = ", ".join(f"{part} {len(members)}" for part, members in cut.items())
    _require_every_part(cut, f"{len(ordered)} classes at fractions "
                             f"{','.join(map(str, fractions))} ({sizes})")
    return {part: sorted(members) for part, members in cut.items()}


def _require_every_part(parts: dict[str, list[str]], where: str) -> None:
    for part, members in parts.items():
        if not members:
            raise FolderSourceError(f"{where} leaves part {part!r} with no classes; every part "
                                    "needs at least one (use a split file or other fractions)")


# ----------------------------------------------------------------------------- images


def image_channels(path: Path) -> int:
    """1 or 3: the channels an image has by its mode (read from the header only)."""
    try:
        with Image.open(path) as image:
            mode = image.mode
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise _unreadable(path, error) from error
    return 1 if mode in ONE_CHANNEL_MODES or mode.startswith("I;16") else 3


def common_channels(classes: list[FolderClass], root: Path) -> int:
    """The channels all images share, or an error naming one grayscale and one colour file."""
    example: dict[int, Path] = {}
    for folder_class in classes:
        for path in folder_class.files:
            example.setdefault(image_channels(path), path)
    if len(example) > 1:
        raise FolderSourceError(f"images in {root} mix channel counts: {example[1]} is grayscale "
                                f"and {example[3]} colour; pass --channels 1 or --channels 3 to "
                                "convert them all")
    return next(iter(example))


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 [channels, size, size] (see the module's resize policy)."""
    try:
        with Image.open(path) as image:
            image.load()
            converted = convert_channels(image, channels)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise _unreadable(path, error) from error
    array = np.asarray(resize_shorter_and_crop(converted, size), dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def convert_channels(image: Image.Image, channels: int) -> Image.Image:
    """L or RGB; transparency composited onto white, 16-bit grayscale scaled to 8 bits."""
    mode = "L" if channels == 1 else "RGB"
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) // 257).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    return image.convert(mode)


def resize_shorter_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bilinear; Pillow widens the filter when shrinking, so it is
    antialiased), then the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _unreadable(path: Path, error: Exception) -> FolderSourceError:
    return FolderSourceError(f"cannot read image {path} ({error}); replace or remove the file")


def load_class(folder_class: FolderClass, size: int, channels: int) -> np.ndarray:
    return np.stack([load_image(path, size, channels) for path in folder_class.files])


# ----------------------------------------------------------------------------- packing


def pack_folder(root: str | Path, out_dir: str | Path, *, size: int = DEFAULT_SIZE,
                channels: int | None = None, split_file: str | Path | None = None,
                fractions=DEFAULT_FRACTIONS, seed: int = 0,
                classes_per_shard: int = shards.DEFAULT_CLASSES_PER_SHARD,
                quiet: bool = False) -> Path:
    """Pack the image folder ``root`` into a shard set at ``out_dir`` and return that folder.

    Every check that needs no decoding (destination, layout, split, channels) runs before
    anything is written; an existing set at ``out_dir`` is replaced only once the new one is
    complete, and anything else there is refused (``shards.check_destination``).
    """
    root = Path(root)
    check_image_options(size, channels, classes_per_shard, seed)
    shards.check_destination(out_dir, root)
    classes = list_classes(root)
    by_name = {c.name: c for c in classes}
    if split_file is not None:
        split_file = Path(split_file)
        parts = split_from_file(split_file, set(by_name), root)
        split_source = {"kind": "file", "file": split_file.name,
                        "sha256": hashlib.sha256(split_file.read_bytes()).hexdigest()}
    else:
        parts = split_by_fractions(list(by_name), fractions, seed)
        split_source = {"kind": "fractions", "fractions": [float(f) for f in fractions],
                        "seed": seed}
    return pack_classes(classes, parts, out_dir, dataset="folder", split_source=split_source,
                        where=root, size=size, channels=channels, seed=seed,
                        classes_per_shard=classes_per_shard, quiet=quiet)


def check_image_options(size, channels, classes_per_shard: int, seed: int) -> None:
    shards.check_pack_options(classes_per_shard, seed)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


def pack_classes(classes: list[FolderClass], parts: dict[str, list[str]], out_dir: str | Path,
                 *, dataset: str, split_source: dict, where: Path, size: int,
                 channels: int | None, seed: int, classes_per_shard: int, quiet: bool) -> Path:
    """The packing core shared by the folder and benchmark packers: ``classes`` (all listed, in
    the order that gives their ids) and ``parts`` (part -> class names) into a shard set."""
    by_name = {c.name: c for c in classes}
    used = [by_name[name] for part in shards.PARTS for name in parts[part]]
    channels = channels or common_channels(used, where)
    ids = {c.name: i for i, c in enumerate(classes, start=1)}  # position among all listed
    entries = {part: [_entry(by_name[name], ids[name], part, size, channels)
                      for name in parts[part]] for part in shards.PARTS}
    header = {"dataset": dataset, "channels": channels, "image_size": size, "rotate": False,
              "seed": seed, "split_source": split_source,
              "source": {"folder": where.resolve().name, "classes": len(classes),
                         "classes_used": len(used),
                         "images_used": sum(len(c.files) for c in used)}}
    total = header["source"]["images_used"]
    with progress(total=total, unit="img", desc=f"packing {where.name}", quiet=quiet) as bar:
        return shards.write_shard_set(out_dir, entries, header,
                                      classes_per_shard=classes_per_shard, on_class=bar.update)


def _entry(folder_class: FolderClass, class_id: int, part: str, size: int,
           channels: int) -> shards.ClassEntry:
    meta = {"id": class_id, "name": folder_class.name, "part": part,
            "files": [path.name for path in folder_class.files]}
    key = f"{class_id:06d}-" + re.sub(r"[^A-Za-z0-9_()-]", "_", folder_class.name)
    return shards.ClassEntry(key, meta, lambda: load_class(folder_class, size, channels))
