"""Pack Omniglot into WebDataset shards with a manifest, and open and verify a shard set.

A shard set is one folder::

    train-000000.tar ... val-000000.tar ... test-000000.tar   manifest.json

Each tar sample is one character class: ``<key>.npy`` holds all its drawings as one uint8 array
``[20, H, W]`` (strokes bright on dark) and ``<key>.json`` its metadata (alphabet, character,
global id, drawers, split, part). The manifest records the split, image size, per-part counts,
every shard's SHA-256 and the source archives' checksums.

Packing is reproducible (fixed tar headers, sorted classes, seeded split) and atomic (written
to a hidden temporary folder beside the destination, then renamed into place).

Example::

    out = pack_omniglot("../shared/data/omniglot", "futurama", "shards/omniglot-futurama")
    pool = load_class_pool(out, "train")     # verifies SHA-256 first
    pool.images.shape                        # torch.Size([838, 20, 28, 28])
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from fsl_dist import __version__
from fsl_dist.data import omniglot

MANIFEST = "manifest.json"
FORMAT = "fsl_dist/omniglot-shards"
PACKER_VERSION = 1  # bump when the bytes written for the same source change
DEFAULT_CLASSES_PER_SHARD = 32
SHARD_NAME = "{part}-{index:06d}.tar"
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


class ShardError(ValueError):
    """A shard set is missing, incomplete or altered. The message names the file and the fix."""


@dataclass(frozen=True)
class ClassPool:
    """All classes of one part of a shard set, in memory."""

    images: torch.Tensor  # uint8 [C, D, H, W], strokes bright on dark
    classes: list[dict]  # JSON metadata per class, same order as images
    part: str
    shard_dir: Path

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def drawings_per_class(self) -> int:
        return self.images.shape[1]


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
) -> Path:
    """Pack one named split of Omniglot into a shard set at ``out_dir`` and return that folder.

    ``source`` is a folder with the official zips or extracted folders (checked by content), or
    None for the download cache (checked by MD5). An existing set at ``out_dir`` is replaced
    only once the new one is complete.
    """
    if split not in omniglot.SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(omniglot.SPLITS)}")
    if classes_per_shard < 1:
        raise ValueError(f"classes_per_shard must be at least 1, got {classes_per_shard}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    archives = omniglot.SPLIT_ARCHIVES[split]
    folder = omniglot.resolve_source(source, download=download, archives=archives)
    decoded = omniglot.decode_archives(folder, archives, size)
    parts = omniglot.split_characters(decoded.characters, split, seed)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    staging = out_dir.parent / f".{out_dir.name}{_TMP_MARK}{os.getpid()}"
    staging.mkdir()
    try:
        manifest = _write_shard_set(staging, decoded, parts, split=split, size=size,
                                    classes_per_shard=classes_per_shard, seed=seed)
        _write_file_synced(staging / MANIFEST, _manifest_bytes(manifest))
        _fsync_dir(staging)
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _write_shard_set(staging, decoded, parts, *, split, size, classes_per_shard, seed) -> dict:
    splits = {}
    for part in omniglot.PARTS:
        indices = parts[part]
        shards = []
        for start in range(0, len(indices), classes_per_shard):
            chunk = indices[start:start + classes_per_shard]
            name = SHARD_NAME.format(part=part, index=len(shards))
            data = _shard_bytes(decoded, chunk, split=split, part=part)
            _write_file_synced(staging / name, data)
            shards.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                           "bytes": len(data), "classes": len(chunk)})
        splits[part] = {"classes": len(indices),
                        "images": len(indices) * omniglot.DRAWINGS_PER_CHARACTER,
                        "shards": shards}
    return {
        "format": FORMAT,
        "dataset": "omniglot",
        "split": split,
        "seed": seed,
        "image_size": size,
        "drawings_per_class": omniglot.DRAWINGS_PER_CHARACTER,
        "classes_per_shard": classes_per_shard,
        "splits": splits,
        "source": decoded.checksums,
        "packer": {"name": "fsl_dist", "version": __version__, "packer_version": PACKER_VERSION,
                   "numpy": np.__version__, "pillow": _pillow_version()},
    }


def _shard_bytes(decoded, indices, *, split: str, part: str) -> bytes:
    """One tar in memory, with fixed headers so the same input gives the same bytes."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, mtime=0, user="fsl_dist", group="fsl_dist") as tar:
        for i in indices:
            character = decoded.characters[i]
            meta = {"alphabet": character.alphabet, "character": character.name,
                    "id": character.char_id, "drawers": list(character.drawers),
                    "archive": character.archive, "split": split, "part": part}
            tar.write({"__key__": class_key(character.alphabet, character.name),
                       "npy": _npy_bytes(decoded.images[i]),
                       "json": json.dumps(meta, sort_keys=True).encode()})
    return buffer.getvalue()


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
    """Rename the finished set into place; an earlier set is moved aside first, then deleted.

    Between the two renames the earlier set lives at ``.<name>.old-<pid>``: a crash exactly
    there leaves it recoverable, never a half-written set at ``out_dir``.
    """
    if out_dir.exists():
        retired = out_dir.parent / f".{out_dir.name}{_OLD_MARK}{os.getpid()}"
        out_dir.rename(retired)
        staging.rename(out_dir)
        shutil.rmtree(retired)
    else:
        staging.rename(out_dir)
    _fsync_dir(out_dir.parent)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete staging folders of packs to ``out_dir`` whose process no longer runs."""
    for path in out_dir.parent.glob(f".{out_dir.name}{_TMP_MARK}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- opening


def _repack_hint(shard_dir: Path, split: str | None = None) -> str:
    split_arg = split or "NAME"
    return (f"re-pack it: python launch/pack.py omniglot --source DIR --split {split_arg} "
            f"--out {shard_dir}")


def load_manifest(shard_dir: str | Path) -> dict:
    """Read and sanity-check ``manifest.json`` of a shard set."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not path.is_file():
        why = "does not exist" if not shard_dir.exists() else f"has no {MANIFEST}"
        raise ShardError(f"shard set {shard_dir} {why}; {_repack_hint(shard_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{path} is unreadable ({error}); {_repack_hint(shard_dir)}") from error
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or "splits" not in manifest):
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
    hint = _repack_hint(shard_dir, manifest.get("split"))
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
                         f"manifest says {entry['classes']}; {_repack_hint(shard_dir)}")
    tensor = (torch.from_numpy(np.stack(images)) if images
              else torch.empty(0, 0, 0, 0, dtype=torch.uint8))
    return ClassPool(images=tensor, classes=classes, part=part, shard_dir=shard_dir)


def read_shard(path: Path):
    """Yield the raw samples (dicts of bytes) of one local shard."""
    try:
        yield from wds.tarfile_to_samples()([{"url": str(path)}])
    except Exception as error:  # tarfile/IO errors deep inside webdataset: name the file
        raise ShardError(f"cannot read shard {path} ({error}); "
                         f"{_repack_hint(path.parent)}") from error


def decode_class_sample(sample: dict, where: Path | str) -> tuple[np.ndarray, dict]:
    """One raw sample -> (uint8 array [D, H, W], metadata dict)."""
    try:
        array = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        meta = json.loads(sample["json"])
    except (KeyError, ValueError, OSError) as error:
        raise ShardError(f"sample {sample.get('__key__')!r} of {where} is malformed ({error!r}); "
                         f"{_repack_hint(Path(where).parent)}") from error
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ShardError(f"sample {sample.get('__key__')!r} of {where} has a {array.dtype} array "
                         f"of shape {array.shape}, expected uint8 [D, H, W]")
    return array, meta
