"""Omniglot source data: find it, check it by content, decode it, and split its characters.

The official release (Lake et al., 2015) is two archives, ``images_background.zip`` (30
alphabets, 964 characters) and ``images_evaluation.zip`` (20 alphabets, 659 characters), each
character drawn once by 20 drawers as a 105x105 1-bit PNG named ``CCCC_DD.png`` (global character
id, drawer). A source folder may hold the zips or their extracted folders.

A local source is checked by content (alphabets, characters, drawings), never by the archive's
MD5: re-packed copies of the same pixels are common. Only files this module downloads itself
are checked against the official MD5 sums (the ones torchvision's ``Omniglot`` uses).

Example::

    src = resolve_source("../shared/data/omniglot", download=False)
    decoded = decode_archives(src, ("images_background",), size=28)
    parts = split_characters(decoded.characters, "futurama", seed=0)
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND = "images_background"
EVALUATION = "images_evaluation"
ARCHIVES = (BACKGROUND, EVALUATION)

# The files torchvision downloads (torchvision/datasets/omniglot.py: download_url_prefix, zips_md5).
DOWNLOAD_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}.zip"
OFFICIAL_MD5 = {
    BACKGROUND: "68d2efa1b9178cc56df9314c21c6e718",
    EVALUATION: "6b91aef0f799c5bb55b94e3f2daec811",
}

DRAWINGS_PER_CHARACTER = 20
SOURCE_SIZE = 105

# Characters per alphabet in the official release; the content check compares against this.
ALPHABETS = {
    BACKGROUND: {
        "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
        "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46,
        "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14, "Braille": 26, "Burmese_(Myanmar)": 34,
        "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43, "Greek": 24,
        "Gujarati": 48, "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
        "Japanese_(hiragana)": 52, "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26,
        "Malay_(Jawi_-_Arabic)": 40, "Mkhedruli_(Georgian)": 41, "N_Ko": 33,
        "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14, "Sanskrit": 42, "Syriac_(Estrangelo)": 23,
        "Tagalog": 17, "Tifinagh": 55,
    },
    EVALUATION: {
        "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26,
        "Ge_ez": 26, "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26,
        "Malayalam": 47, "Manipuri": 40, "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45,
        "Oriya": 46, "Sylheti": 28, "Syriac_(Serto)": 23, "Tengwar": 25, "Tibetan": 42, "ULOG": 26,
    },
}

FUTURAMA = "Futurama"
SPLITS = ("lake", "vinyals", "futurama")
PARTS = ("train", "val", "test")
VAL_CLASSES = 100  # characters held out for validation in every split
VINYALS_TRAIN, VINYALS_TEST = 1100, 423
SPLIT_ARCHIVES = {"lake": ARCHIVES, "vinyals": ARCHIVES, "futurama": (BACKGROUND,)}

_PNG_NAME = re.compile(r"^(\d{4})_(\d{2})\.png$")
_MAX_LISTED_PROBLEMS = 25


class OmniglotSourceError(ValueError):
    """The Omniglot source is missing, incomplete, corrupt or fails its checksum."""


@dataclass(frozen=True)
class Character:
    """One character class of the source: where it lives and who drew it."""

    archive: str  # images_background or images_evaluation
    alphabet: str
    name: str  # character01, character02, ...
    char_id: int  # global id 1..1623, from the file names
    drawers: tuple[int, ...]  # 1..20, in the order of the decoded drawings
    members: tuple[str, ...]  # paths of the PNGs inside the archive, same order as drawers


@dataclass(frozen=True)
class DecodedSource:
    """All characters of some archives, decoded and resized."""

    characters: tuple[Character, ...]
    images: np.ndarray  # uint8 [C, 20, size, size], strokes bright (255) on dark (0)
    checksums: dict  # archive name -> checksum record (see _checksum_record)


# ----------------------------------------------------------------------------- locating


def default_cache_dir() -> Path:
    """Where downloads go: ``$FSL_DATA_HOME/omniglot`` or ``~/.cache/fsl_dist/omniglot``."""
    home = os.environ.get("FSL_DATA_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "fsl_dist"
    return base / "omniglot"


def resolve_source(
    source: str | Path | None, *, download: bool = True, archives: tuple[str, ...] = ARCHIVES
) -> Path:
    """Return a folder holding the given archives (as zips or extracted folders).

    With ``source`` given, the folder must exist and hold each archive; its content is checked
    later, when decoded. Without it, the cache folder is used and any missing official zip is
    downloaded (if ``download``); cached zips must match the official MD5.
    """
    if source is not None:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise OmniglotSourceError(f"Omniglot source folder {folder} does not exist; pass the "
                                      "folder holding images_background.zip and "
                                      "images_evaluation.zip")
        missing = [name for name in archives
                   if not (folder / f"{name}.zip").is_file() and not (folder / name).is_dir()]
        if missing:
            wanted = " and ".join(f"{name}.zip (or an extracted {name}/ folder)"
                                  for name in missing)
            raise OmniglotSourceError(f"{folder} lacks {wanted}; put the official Omniglot "
                                      "archives there or pass another --source")
        return folder
    cache = default_cache_dir()
    for name in archives:
        zip_path = cache / f"{name}.zip"
        if not zip_path.exists():
            if not download:
                raise OmniglotSourceError(
                    f"{zip_path} is missing and downloading is off; pass --source DIR with the "
                    "official Omniglot zips, or allow the download")
            _download_official(name, zip_path)
        _check_official_md5(zip_path, name)
    return cache


def _download_official(name: str, destination: Path) -> None:
    """Download one official zip to a side file, check its MD5, then move it into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    url = DOWNLOAD_URL.format(name=name)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise OmniglotSourceError(f"could not download {url}: {error}; download it by hand into "
                                  f"{destination.parent} or pass --source DIR") from error
    _check_official_md5(partial, name)
    partial.replace(destination)


def _check_official_md5(path: Path, name: str) -> None:
    actual = file_digest(path, "md5")
    if actual != OFFICIAL_MD5[name]:
        raise OmniglotSourceError(
            f"{path} has MD5 {actual}, not the official {OFFICIAL_MD5[name]}; delete it and "
            "download again, or pass --source DIR to use a local copy (checked by content)")


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _archive_location(folder: Path, name: str) -> Path:
    """The zip (preferred: it is the official artifact) or else the extracted folder."""
    zip_path = folder / f"{name}.zip"
    if zip_path.is_file():
        return zip_path
    if (folder / name).is_dir():
        return folder / name
    raise OmniglotSourceError(f"{folder} holds neither {name}.zip nor an extracted {name}/ folder; "
                              "put the official Omniglot archives there")


# ----------------------------------------------------------------------------- reading


class _ArchiveReader:
    """Uniform listing and reading for a zip or an extracted folder of one archive."""

    def __init__(self, location: Path, name: str):
        self.location = location
        self.name = name
        self._zip = zipfile.ZipFile(location) if location.suffix == ".zip" else None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def png_members(self) -> list[str]:
        """Paths ``Alphabet/characterNN/CCCC_DD.png`` relative to the archive's root folder."""
        if self._zip is not None:
            prefix = self.name + "/"
            return sorted(n[len(prefix):] for n in self._zip.namelist()
                          if n.startswith(prefix) and n.endswith(".png"))
        return sorted(p.relative_to(self.location).as_posix()
                      for p in self.location.glob("*/*/*.png"))

    def read(self, member: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(f"{self.name}/{member}")
        return (self.location / member).read_bytes()


def list_characters(members: list[str], archive: str) -> tuple[Character, ...]:
    """Group PNG paths into characters and check them against the official content.

    Raises OmniglotSourceError naming every missing alphabet, character and drawing.
    """
    found: dict[tuple[str, str], dict[int, tuple[int, str]]] = {}
    for member in members:
        parts = member.split("/")
        match = _PNG_NAME.match(parts[-1]) if len(parts) == 3 else None
        if match:
            drawings = found.setdefault((parts[0], parts[1]), {})
            drawings[int(match.group(2))] = (int(match.group(1)), member)
    problems, characters = [], []
    for alphabet, count in ALPHABETS[archive].items():
        names = [f"character{i:02d}" for i in range(1, count + 1)]
        if not any((alphabet, n) in found for n in names):
            problems.append(f"alphabet {alphabet} ({count} characters) is missing")
            continue
        for name in names:
            character, problem = _check_character(archive, alphabet, name,
                                                  found.get((alphabet, name)))
            if problem:
                problems.append(problem)
            else:
                characters.append(character)
    if problems:
        raise OmniglotSourceError(_describe_problems(archive, problems))
    return tuple(characters)


def _check_character(archive, alphabet, name, drawings):
    """Return (Character, None) if complete, else (None, what is missing)."""
    where = f"{alphabet}/{name}"
    if not drawings:
        return None, f"{where} is missing"
    wanted = range(1, DRAWINGS_PER_CHARACTER + 1)
    missing = [f"{d:02d}" for d in wanted if d not in drawings]
    if missing:
        return None, f"{where} is missing drawings {', '.join(missing)}"
    ids = {drawings[d][0] for d in wanted}
    if len(ids) != 1:
        return None, f"{where} mixes character ids {sorted(ids)} in its file names"
    character = Character(archive, alphabet, name, ids.pop(), tuple(wanted),
                          tuple(drawings[d][1] for d in wanted))
    return character, None


def _describe_problems(archive: str, problems: list[str]) -> str:
    expected = ALPHABETS[archive]
    shown = problems[:_MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    lines = [f"{archive} is incomplete (expected {len(expected)} alphabets, "
             f"{sum(expected.values())} characters, {DRAWINGS_PER_CHARACTER} drawings each):"]
    lines += [f"  - {p}" for p in shown]
    if more:
        lines.append(f"  - ... and {more} more")
    lines.append("Replace it with a complete copy of the official Omniglot release.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- decoding


def decode_archives(source: Path, archives: tuple[str, ...], size: int) -> DecodedSource:
    """Decode every character of the archives at ``size`` x ``size``, checked by content.

    The result is cached per process (keyed by the files' paths, sizes and mtimes), since
    decoding 32k PNGs takes seconds and tests pack several splits from one source.
    """
    if not 1 <= size <= SOURCE_SIZE:
        raise ValueError(f"image size {size} is outside 1..{SOURCE_SIZE}; Omniglot drawings are "
                         f"{SOURCE_SIZE}x{SOURCE_SIZE} and are only ever reduced")
    parts = [_decode_archive_cached(*_cache_key(Path(source), name), size) for name in archives]
    return DecodedSource(
        characters=tuple(c for p in parts for c in p.characters),
        images=np.concatenate([p.images for p in parts]),
        checksums={name: dict(p.checksums[name]) for name, p in zip(archives, parts)},
    )


def clear_decode_cache() -> None:
    """Forget decoded archives (tests use this to prove packing does not depend on the cache)."""
    _decode_archive_cached.cache_clear()


def _cache_key(source: Path, name: str) -> tuple[str, str, int, int]:
    location = _archive_location(source, name)
    stat = location.stat()
    return str(location.resolve()), name, stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _decode_archive_cached(location: str, name: str, _bytes: int, _mtime: int, size: int):
    reader = _ArchiveReader(Path(location), name)
    try:
        characters = list_characters(reader.png_members(), name)
        images = np.empty((len(characters), DRAWINGS_PER_CHARACTER, size, size), np.uint8)
        content = hashlib.sha256()
        for c, character in enumerate(characters):
            for d, member in enumerate(character.members):
                data = reader.read(member)
                content.update(member.encode() + b"\0" + data)
                images[c, d] = _decode_drawing(data, size, where=f"{location}: {member}")
    finally:
        reader.close()
    images.setflags(write=False)  # shared through the cache: nobody may change it
    return DecodedSource(tuple(characters), images,
                         {name: _checksum_record(Path(location), content.hexdigest())})


def _decode_drawing(png: bytes, size: int, *, where: str) -> np.ndarray:
    """One PNG -> uint8 [size, size], strokes bright on dark (the MAML protocol's 1 - image)."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            gray = image.convert("L")
    except (OSError, ValueError) as error:
        raise OmniglotSourceError(f"cannot decode {where}: {error}; the source is corrupt, "
                                  "replace it with the official files") from error
    if gray.size != (SOURCE_SIZE, SOURCE_SIZE):
        raise OmniglotSourceError(f"{where} is {gray.size[0]}x{gray.size[1]}, "
                                  f"not {SOURCE_SIZE}x{SOURCE_SIZE}; replace the source")
    return omniglot_pixels(gray, size)


def omniglot_pixels(gray: Image.Image, size: int) -> np.ndarray:
    """A grayscale drawing -> uint8 [size, size], inverted (strokes bright on dark), resized
    when its size differs (also how prediction prepares images for an Omniglot model)."""
    inverted = Image.fromarray(255 - np.asarray(gray))
    if inverted.size != (size, size):
        # LANCZOS over the whole support is PIL's antialiased reduction (as in MAML's resize).
        inverted = inverted.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(inverted)


def _checksum_record(location: Path, content_sha256: str) -> dict:
    """What the manifest records about one source archive.

    ``content_sha256`` covers every PNG path and its bytes, so a zip and its extracted folder
    agree; a zip also gets its file's SHA-256 and MD5 and whether that MD5 is the official one.
    """
    record = {"kind": "folder", "content_sha256": content_sha256}
    if location.suffix == ".zip":
        md5 = file_digest(location, "md5")
        record.update(kind="zip", file=location.name, sha256=file_digest(location),
                      md5=md5, official_md5=md5 == OFFICIAL_MD5[location.stem])
    return record


# ----------------------------------------------------------------------------- splits


def split_characters(characters: tuple[Character, ...], split: str,
                     seed: int) -> dict[str, list[int]]:
    """Assign characters (by position in ``characters``) to train/val/test for a named split.

    One global seed decides everything, so every process and rank computes the same split.
    Each part is returned sorted by global character id.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    by_id = sorted(range(len(characters)), key=lambda i: characters[i].char_id)
    rng = np.random.default_rng(seed)
    if split == "vinyals":
        _require_count(characters, VINYALS_TRAIN + VAL_CLASSES + VINYALS_TEST, split)
        order = [by_id[j] for j in rng.permutation(len(by_id))]
        train, val, test = np.split(order, [VINYALS_TRAIN, VINYALS_TRAIN + VAL_CLASSES])
    else:
        if split == "lake":
            is_test = [characters[i].archive == EVALUATION for i in by_id]
        else:  # futurama
            is_test = [characters[i].alphabet == FUTURAMA for i in by_id]
        pool = [i for i, t in zip(by_id, is_test) if not t]
        test = [i for i, t in zip(by_id, is_test) if t]
        if not test:
            raise ValueError(f"split {split!r} found no test characters in the decoded archives")
        shuffled = [pool[j] for j in rng.permutation(len(pool))]
        val, train = shuffled[:VAL_CLASSES], shuffled[VAL_CLASSES:]
    key = lambda i: characters[i].char_id  # noqa: E731
    return {"train": sorted(map(int, train), key=key), "val": sorted(map(int, val), key=key),
            "test": sorted(map(int, test), key=key)}


def _require_count(characters, expected: int, split: str) -> None:
    if len(characters) != expected:
        raise ValueError(f"split {split!r} needs all {expected} characters, got {len(characters)}; "
                         "decode both archives")
