"""Pack few-shot data sets into WebDataset shards with a manifest; open and verify a shard set.

A shard set is one folder::

    train-000000.tar ... val-000000.tar ... test-000000.tar   manifest.json

Each tar sample is one class: ``<key>.npy`` holds all its images as one uint8 array
``[n, C, H, W]`` (``n`` may differ between classes; C is 1 or 3; H = W) and ``<key>.json`` its
metadata (at least a unique ``id``; Omniglot adds alphabet, character, drawers, ...). The
manifest records the format and its version, the data set's name, channels, image size, the
split's source, per-part and per-class image counts, every shard's SHA-256, the source's
checksums and the packer's version. Sets of an older format are refused with the command that
re-packs them.

Packing is reproducible (fixed tar headers, sorted classes, seeded split) and atomic (written
to a hidden temporary folder beside the destination, then renamed into place).

Packing replaces its destination only when it is absent, empty, or holds a shard set and nothing
else (``check_destination``): a ``manifest.json`` of an fsl_dist format and files named as the
packers name shards (``train-000000.tar``, ...), plus the files operating systems leave in any
folder (``OS_JUNK``). Anything else is refused before any image is read, and so is a destination
that is, holds, or lies inside the source. Replacing removes only those names, never a tree.

Example::

    out = pack_omniglot("../shared/data/omniglot", "futurama", "shards/omniglot-futurama")
    pool = load_class_pool(out, "train")     # verifies SHA-256 first
    pool.images.shape                        # torch.Size([16760, 1, 28, 28]): 838 classes x 20
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import webdataset as wds

from fsl_dist import __version__
from fsl_dist.data import omniglot
from fsl_dist.io import writing
from fsl_dist.progress import progress

MANIFEST = "manifest.json"
FORMAT = "fsl_dist/class-shards"
FORMAT_VERSION = 2  # bump when a reader of the previous version would misread the set
OLD_FORMATS = {"fsl_dist/omniglot-shards": 1}  # earlier formats, refused with a repack command
PACKER_VERSION = 2  # bump when the bytes written for the same source change
DEFAULT_CLASSES_PER_SHARD = 32
SHARD_NAME = "{part}-{index:06d}.tar"
PARTS = ("train", "val", "test")
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"
_SHARD_FILE = re.compile(r"^(train|val|test)-\d{6}\.tar$")  # SHARD_NAME's names, every version
# What Finder, Explorer, desktop file managers and macOS's zip tool leave in folders on their
# own: never an image or a class, never a user's work. AppleDouble companions ("._<name>") are
# matched by prefix. Only plain files among these are ever deleted (see _junk_file).
OS_JUNK = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", ".directory",
                     "icon\r", "__macosx", "$recycle.bin", "system volume information"})


class ShardError(ValueError):
    """A shard set is missing, incomplete or altered. The message names the file and the fix."""


@dataclass(frozen=True)
class ClassPool:
    """All classes of one part of a shard set, in memory, as one flat stack of images."""

    images: torch.Tensor  # uint8 [sum of counts, C, H, W]: class c's images are consecutive
    counts: np.ndarray  # int64 [classes]: images of each class
    classes: list[dict]  # JSON metadata per class, same order as counts
    part: str
    shard_dir: Path

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """int64 [classes]: row of each class's first image in ``images``."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def class_images(self, index: int) -> torch.Tensor:
        """uint8 [n, C, H, W]: every image of class ``index``."""
        start = int(self.offsets[index])
        return self.images[start:start + int(self.counts[index])]


@dataclass(frozen=True)
class ClassEntry:
    """One class to pack: its sample key, its metadata and how to get its images."""

    key: str
    meta: dict  # must hold a unique "id"
    load: Callable[[], np.ndarray]  # -> uint8 [n, C, size, size]


# ----------------------------------------------------------------------------- packing


def pack_omniglot(
    source: str | Path | None,
    split: str,
    out_dir: str | Path,
    *,
    size: int = 28,
    classes_per_shard: int = DEFAULT_CLASSES_PER_SHARD,
    seed: int = 0,
    download: bool = True,
    quiet: bool = False,
) -> Path:
    """Pack one named split of Omniglot into a shard set at ``out_dir`` and return that folder.

    ``source`` is a folder with the official zips or extracted folders (checked by content), or
    None for the download cache (checked by MD5). An existing set at ``out_dir`` is replaced
    only once the new one is complete; a destination that is not a set is refused first
    (``check_destination``). A progress bar counts the images written (plain lines in a log;
    none if ``quiet``).
    """
    if split not in omniglot.SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(omniglot.SPLITS)}")
    check_pack_options(classes_per_shard, seed)
    check_destination(out_dir, source if source is not None else omniglot.default_cache_dir())
    archives = omniglot.SPLIT_ARCHIVES[split]
    folder = omniglot.resolve_source(source, download=download, archives=archives)
    decoded = omniglot.decode_archives(folder, archives, size)
    parts = omniglot.split_characters(decoded.characters, split, seed)
    entries = {part: [_omniglot_entry(decoded, i, split, part) for i in parts[part]]
               for part in PARTS}
    header = {"dataset": "omniglot", "split": split, "seed": seed, "channels": 1,
              "image_size": size, "rotate": True, "source": decoded.checksums,
              "split_source": {"kind": "named", "split": split, "seed": seed}}
    images = sum(int(decoded.images[i].shape[0]) for part in PARTS for i in parts[part])
    with progress(total=images, unit="img", desc=f"packing omniglot-{split}", quiet=quiet) as bar:
        return write_shard_set(out_dir, entries, header, classes_per_shard=classes_per_shard,
                               on_class=bar.update)


def check_pack_options(classes_per_shard: int, seed: int) -> None:
    if classes_per_shard < 1:
        raise ValueError(f"classes_per_shard must be at least 1, got {classes_per_shard}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def _omniglot_entry(decoded, index: int, split: str, part: str) -> ClassEntry:
    character = decoded.characters[index]
    meta = {"alphabet": character.alphabet, "character": character.name,
            "id": character.char_id, "drawers": list(character.drawers),
            "archive": character.archive, "split": split, "part": part}
    return ClassEntry(class_key(character.alphabet, character.name), meta,
                      lambda: decoded.images[index][:, None])  # one channel


def _failures_name_the_set(write_set: Callable) -> Callable:
    """A write failure of ``write_set(out_dir, ...)`` (no space, no permission, read-only, a
    file in the path) is one WriteFailure naming ``out_dir``, not its hidden staging folder.
    Other OSErrors pass: the sources' read errors are ValueErrors by then."""
    @functools.wraps(write_set)
    def wrapper(out_dir, *args, **kwargs):
        with writing(Path(out_dir)):
            return write_set(out_dir, *args, **kwargs)
    return wrapper


@_failures_name_the_set
def write_shard_set(out_dir: str | Path, parts: dict[str, list[ClassEntry]], header: dict, *,
                    classes_per_shard: int, on_class: Callable[[int], None] | None = None
                    ) -> Path:
    """Write ``parts`` (part -> classes, in order) as a shard set at ``out_dir``, atomically.

    ``header`` holds the manifest's data-set fields: at least ``dataset``, ``channels``,
    ``image_size`` and ``split_source``. ``on_class(images)`` is called after each class (for
    a progress bar). An existing set at ``out_dir`` is replaced only once the new one is complete;
    anything else there is refused (``check_destination``), before writing and again before the
    swap.
    """
    out_dir = Path(out_dir)
    check_destination(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    staging = out_dir.parent / f".{out_dir.name}{_TMP_MARK}{os.getpid()}"
    staging.mkdir()
    try:
        splits = {part: _write_part(staging, part, parts[part], header, classes_per_shard,
                                    on_class) for part in PARTS}
        manifest = {**header, "format": FORMAT, "format_version": FORMAT_VERSION,
                    "classes_per_shard": classes_per_shard, "splits": splits,
                    "packer": {"name": "fsl_dist", "version": __version__,
                               "packer_version": PACKER_VERSION, "numpy": np.__version__,
                               "pillow": _pillow_version()}}
        _write_file_synced(staging / MANIFEST, _manifest_bytes(manifest))
        _fsync_dir(staging)
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _write_part(staging: Path, part: str, entries: list[ClassEntry], header: dict,
                classes_per_shard: int, on_class) -> dict:
    shards, counts = [], []
    for start in range(0, len(entries), classes_per_shard):
        chunk = entries[start:start + classes_per_shard]
        name = SHARD_NAME.format(part=part, index=len(shards))
        data, chunk_counts = _shard_bytes(chunk, header, on_class)
        _write_file_synced(staging / name, data)
        shards.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                       "bytes": len(data), "classes": len(chunk)})
        counts += chunk_counts
    return {"classes": len(entries), "images": sum(counts), "images_per_class": counts,
            "shards": shards}


def _shard_bytes(entries: list[ClassEntry], header: dict, on_class) -> tuple[bytes, list[int]]:
    """One tar in memory, with fixed headers so the same input gives the same bytes."""
    buffer, counts = io.BytesIO(), []
    wanted = (header["channels"], header["image_size"], header["image_size"])
    with wds.TarWriter(buffer, encoder=False, mtime=0, user="fsl_dist", group="fsl_dist") as tar:
        for entry in entries:
            images = entry.load()
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != wanted:
                raise ValueError(f"class {entry.key!r} gives a {images.dtype} array of shape "
                                 f"{images.shape}, expected uint8 [n, C, H, W] = [n, {wanted}]")
            tar.write({"__key__": entry.key, "npy": _npy_bytes(images),
                       "json": json.dumps(entry.meta, sort_keys=True).encode()})
            counts.append(int(images.shape[0]))
            if on_class is not None:
                on_class(int(images.shape[0]))
    return buffer.getvalue(), counts


def class_key(alphabet: str, character: str) -> str:
    """Sample key from alphabet and character; WebDataset splits keys at dots, so none survive."""
    return re.sub(r"[^A-Za-z0-9_()-]", "_", f"{alphabet}--{character}")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


def _write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished set into place; an earlier set is moved aside first, then its files
    are deleted by name.

    Between the two renames the earlier set lives at ``.<name>.old-<pid>``: a crash exactly
    there leaves it recoverable, never a half-written set at ``out_dir``.
    """
    check_destination(out_dir)  # again: packing took a while, and files may have appeared
    left = []
    if out_dir.exists():
        retired = out_dir.parent / f".{out_dir.name}{_OLD_MARK}{os.getpid()}"
        out_dir.rename(retired)
        staging.rename(out_dir)
        left = _remove_owned(retired)
    else:
        staging.rename(out_dir)
    _fsync_dir(out_dir.parent)
    if left:  # they appeared between the check and the rename: kept, and said where
        raise ShardError(f"the new set is in place at {out_dir}, but files appeared in the "
                         f"earlier folder while it was replaced ({_some_names(left)}); they are "
                         f"kept in {retired}: move them where they belong")


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete the files of staging folders of packs to ``out_dir`` whose process no longer
    runs (only names a packer writes, then the folder if that emptied it)."""
    for path in out_dir.parent.glob(f".{out_dir.name}{_TMP_MARK}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and path.is_dir() and not path.is_symlink() \
                and not _process_alive(int(pid)):
            try:
                _remove_owned(path)
            except OSError:  # a dead pack's leftovers: tidying them must not stop this pack
                pass


# ----------------------------------------------------------------------------- the destination


def is_os_junk(name: str) -> bool:
    """A file that an operating system leaves in folders by itself (``.DS_Store``,
    ``Thumbs.db``, ``desktop.ini``, AppleDouble ``._<name>``, ...), in any letter case."""
    return name.casefold() in OS_JUNK or name.startswith("._")


def check_destination(out_dir: str | Path, source: str | Path | None = None) -> None:
    """Refuse (ShardError, one line) a destination that packing may not replace.

    Refused: ``out_dir`` is, holds or lies inside ``source``; it is a file, a symbolic link or
    the current folder; it holds anything but a shard set (``foreign_entries``). Absent or empty
    is fine.
    """
    out_dir = Path(out_dir)
    if source is not None:
        _check_apart(out_dir, Path(source))
    if out_dir.is_symlink():
        raise ShardError(f"output folder {out_dir} is a symbolic link (to "
                         f"{os.readlink(out_dir)}); pass the folder it points to, or a new one")
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardError(f"output folder {out_dir} is a file, not a folder; pass a new or empty "
                         "folder, or one that holds only a shard set")
    if out_dir.resolve() == Path.cwd().resolve():  # it would be renamed under your shell
        raise ShardError(f"output folder {out_dir} is the current folder; packing replaces the "
                         f"folder it writes, so pass one below or beside it, e.g. "
                         f"{out_dir / 'shards'}")
    foreign = foreign_entries(out_dir)
    if foreign:
        raise _not_a_set(out_dir, foreign)


def foreign_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are not a shard set's, sorted.

    A shard set's: OS junk files (``is_os_junk``) and, only when the folder holds an fsl_dist
    manifest, that ``manifest.json`` and plain files named as shards (``train-000000.tar``).
    Every other entry (a folder, a link, any other file) is foreign. An absent folder has none.
    """
    if not folder.is_dir():
        return []
    entries = sorted(path for path in folder.iterdir() if not _junk_file(path))
    if not _holds_manifest(folder):
        return entries
    return [path for path in entries if not _set_file(path)]


def _not_a_set(out_dir: Path, foreign: list[Path]) -> ShardError:
    folders = sum(1 for path in foreign if path.is_dir() and not path.is_symlink())
    counts = " and ".join(f"{n} {word}{'' if n == 1 else 's'}" for n, word in
                          ((folders, "folder"), (len(foreign) - folders, "file")) if n)
    verb = "is" if len(foreign) == 1 else "are"
    return ShardError(f"output folder {out_dir} holds {counts} that {verb} not part of a shard set "
                      f"({_some_names(foreign)}); packing replaces the whole folder, so nothing "
                      "was packed: pass a new or empty folder, or one that holds only a shard set")


def _check_apart(out_dir: Path, source: Path) -> None:
    out, src = out_dir.resolve(), source.resolve()
    if out == src:
        where = "is the source folder"
    elif src in out.parents:
        where = f"is inside the source folder {source}"
    elif out in src.parents:
        where = f"holds the source folder {source}"
    else:
        return
    named = source if source.name else src  # "." has no name to build on
    raise ShardError(f"output folder {out_dir} {where}; packing there would replace or mix with "
                     f"what it reads, so nothing was packed: pass a folder outside it, e.g. "
                     f"{named.with_name(named.name + '-shards')}")


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _junk_file(path: Path) -> bool:
    return is_os_junk(path.name) and _plain_file(path)


def _set_file(path: Path) -> bool:
    """The manifest or a shard by its name, as a plain file."""
    return (path.name == MANIFEST or bool(_SHARD_FILE.match(path.name))) and _plain_file(path)


def _holds_manifest(folder: Path) -> bool:
    path = folder / MANIFEST
    if not _plain_file(path):
        return False
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and (manifest.get("format") == FORMAT
                                           or manifest.get("format") in OLD_FORMATS)


def _remove_owned(folder: Path) -> list[Path]:
    """Delete a shard set's files in ``folder`` by name (manifest, shards, OS junk), then the
    folder if that emptied it; returns what was left: anything else is never removed."""
    left = []
    for path in sorted(folder.iterdir()):
        if _set_file(path) or _junk_file(path):
            path.unlink()
        else:
            left.append(path)
    if not left:
        folder.rmdir()
    return left


def _some_names(paths: list[Path], shown: int = 4) -> str:
    names = [path.name + ("/" if path.is_dir() and not path.is_symlink() else "")
             for path in paths[:shown]]
    return ", ".join(names) + (f", ... ({len(paths) - shown} more)" if len(paths) > shown else "")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- opening


def repack_command(shard_dir: Path, manifest: dict | None = None) -> str:
    """The command that (re)makes the set at ``shard_dir``, from what its manifest says."""
    manifest = manifest if isinstance(manifest, dict) else {}
    if manifest.get("dataset") not in (None, "omniglot"):  # the folder and benchmark packers
        return f"python launch/pack.py {manifest['dataset']} ROOT --out {shard_dir}"
    split = manifest.get("split") or "NAME"
    return f"python launch/pack.py omniglot --source DIR --split {split} --out {shard_dir}"


def _repack_hint(shard_dir: Path, manifest: dict | None = None) -> str:
    return f"re-pack it: {repack_command(shard_dir, manifest)}"


def load_manifest(shard_dir: str | Path) -> dict:
    """Read and sanity-check ``manifest.json`` of a shard set; older formats are refused."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not path.is_file():
        why = "does not exist" if not shard_dir.exists() else f"has no {MANIFEST}"
        raise ShardError(f"shard set {shard_dir} {why}; {_repack_hint(shard_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{path} is unreadable ({error}); {_repack_hint(shard_dir)}") from error
    if not isinstance(manifest, dict):
        raise ShardError(f"{path} is not an fsl_dist shard manifest; {_repack_hint(shard_dir)}")
    found = manifest.get("format")
    version = OLD_FORMATS.get(found, manifest.get("format_version"))
    if found in OLD_FORMATS or (found == FORMAT and version != FORMAT_VERSION):
        raise ShardError(f"shard set {shard_dir} has the old format {found} version {version} "
                         f"(this fsl_dist reads version {FORMAT_VERSION}); repack with "
                         f"`{repack_command(shard_dir, manifest)}`")
    if found != FORMAT or "splits" not in manifest:
        raise ShardError(f"{path} is not an fsl_dist shard manifest; {_repack_hint(shard_dir)}")
    return manifest


def check_part(manifest: dict, part: str, shard_dir: Path) -> dict:
    """The manifest entry of one part, or a clear error listing the parts there are."""
    if part not in manifest["splits"]:
        raise ValueError(f"unknown part {part!r} of shard set {shard_dir}; "
                         f"choose one of {', '.join(manifest['splits'])}")
    return manifest["splits"][part]


def shard_files(shard_dir: str | Path, part: str, manifest: dict | None = None) -> list[Path]:
    """Paths of one part's shards, in manifest order."""
    shard_dir = Path(shard_dir)
    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    return [shard_dir / s["file"] for s in check_part(manifest, part, shard_dir)["shards"]]


def verify_shards(shard_dir: str | Path, parts: list[str] | tuple[str, ...] | None = None) -> dict:
    """Check that every shard of ``parts`` (default all) exists with its recorded size and SHA-256.

    Returns the manifest. Raises ShardError naming the first bad file.
    """
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    hint = _repack_hint(shard_dir, manifest)
    for part in parts if parts is not None else list(manifest["splits"]):
        for entry in check_part(manifest, part, shard_dir)["shards"]:
            _verify_one(shard_dir / entry["file"], entry, hint)
    return manifest


def _verify_one(path: Path, entry: dict, hint: str) -> None:
    if not path.is_file():
        raise ShardError(f"shard {path} is missing; {hint}")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "longer than recorded"
        raise ShardError(f"shard {path} is {what} ({size} bytes, manifest says "
                         f"{entry['bytes']}); {hint}")
    actual = omniglot.file_digest(path)
    if actual != entry["sha256"]:
        raise ShardError(f"shard {path} fails its SHA-256 check (is {actual}, manifest says "
                         f"{entry['sha256']}): it was altered or corrupted; {hint}")


def load_class_pool(shard_dir: str | Path, part: str, *, verify: bool = True) -> ClassPool:
    """Load every class of one part into memory (Omniglot is about 25 MB at 28x28)."""
    shard_dir = Path(shard_dir)
    manifest = verify_shards(shard_dir, [part]) if verify else load_manifest(shard_dir)
    entry = check_part(manifest, part, shard_dir)
    images, classes = [], []
    for path in shard_files(shard_dir, part, manifest):
        for sample in read_shard(path):
            array, meta = decode_class_sample(sample, path)
            images.append(array)
            classes.append(meta)
    if len(classes) != entry["classes"]:
        raise ShardError(f"shard set {shard_dir} part {part!r} holds {len(classes)} classes, the "
                         f"manifest says {entry['classes']}; {_repack_hint(shard_dir, manifest)}")
    channels, size = manifest["channels"], manifest["image_size"]
    tensor = (torch.from_numpy(np.concatenate(images)) if images
              else torch.empty(0, channels, size, size, dtype=torch.uint8))
    counts = np.array([len(a) for a in images], dtype=np.int64)
    return ClassPool(images=tensor, counts=counts, classes=classes, part=part,
                     shard_dir=shard_dir)


def read_shard(path: Path):
    """Yield the raw samples (dicts of bytes) of one local shard."""
    try:
        yield from wds.tarfile_to_samples()([{"url": str(path)}])
    except Exception as error:  # tarfile/IO errors deep inside webdataset: name the file
        raise ShardError(f"cannot read shard {path} ({error}); "
                         f"{_repack_hint(path.parent)}") from error


def decode_class_sample(sample: dict, where: Path | str) -> tuple[np.ndarray, dict]:
    """One raw sample -> (uint8 array [n, C, H, W], metadata dict)."""
    try:
        array = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        meta = json.loads(sample["json"])
    except (KeyError, ValueError, OSError) as error:
        raise ShardError(f"sample {sample.get('__key__')!r} of {where} is malformed ({error!r}); "
                         f"{_repack_hint(Path(where).parent)}") from error
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ShardError(f"sample {sample.get('__key__')!r} of {where} has a {array.dtype} array "
                         f"of shape {array.shape}, expected uint8 [n, C, H, W]")
    return array, meta


def images_per_class(manifest: dict, part: str) -> list[int]:
    """Images of each class of ``part``, in shard order (as the manifest records them)."""
    return list(manifest["splits"][part]["images_per_class"])


def classes_with_at_least(counts: Iterable[int], needed: int) -> int:
    return sum(1 for count in counts if count >= needed)


def part_bytes(manifest: dict, part: str) -> int:
    """Bytes of one part's images once loaded as uint8 [images, C, H, W], from the manifest."""
    side = manifest["image_size"]
    return int(manifest["splits"][part]["images"]) * manifest["channels"] * side * side


def memory_budget_problem(manifest: dict, parts: Iterable[str], budget_gb: float,
                          shard_dir: Path | str, *, streaming: bool = False) -> str | None:
    """Why loading ``parts`` of a set into each process's memory would exceed ``budget_gb``
    (GB = 10^9 bytes), or None. ``streaming``: the train part streams, only held-out parts
    load."""
    sizes = {part: part_bytes(manifest, part) for part in dict.fromkeys(parts)}
    total = sum(sizes.values())
    if total <= budget_gb * 1e9:
        return None
    listed = ", ".join(f"{part} {_gigabytes(size)}" for part, size in sizes.items())
    fix = ("held-out parts always load into memory; re-pack with fewer val/test classes or raise"
           " data.memory_budget_gb" if streaming else
           "set data.mode=stream to stream the train part, or raise data.memory_budget_gb")
    return (f"{'stream' if streaming else 'memory'} mode would load {_gigabytes(total)} of images"
            f" per process ({listed} of {shard_dir}), above data.memory_budget_gb = {budget_gb:g}"
            f"; {fix}")


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.3g} GB"
