"""Packing: exact counts per split, disjoint parts, reproducible bytes, checksums, source checks."""

import hashlib
import io
import json
import math
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from fsl_dist.data import omniglot, shards

EXPECTED = {  # split -> classes per part
    "lake": {"train": 864, "val": 100, "test": 659},
    "vinyals": {"train": 1100, "val": 100, "test": 423},
    "futurama": {"train": 838, "val": 100, "test": 26},
}
FUTURAMA_IDS = set(range(325, 351))  # 0325..0350, per the shared data README


def part_ids(shard_dir, part):
    return [c["id"] for c in shards.load_class_pool(shard_dir, part).classes]


@pytest.mark.parametrize("split", sorted(EXPECTED))
def test_manifest_counts_and_shards(packed, split):
    out = packed(split)
    manifest = shards.load_manifest(out)
    assert manifest["split"] == split and manifest["image_size"] == 28
    assert manifest["packer"]["packer_version"] == shards.PACKER_VERSION
    for part, classes in EXPECTED[split].items():
        entry = manifest["splits"][part]
        assert entry["classes"] == classes
        assert entry["images"] == 20 * classes
        assert len(entry["shards"]) == math.ceil(classes / shards.DEFAULT_CLASSES_PER_SHARD)
        assert sum(s["classes"] for s in entry["shards"]) == classes
        for index, shard in enumerate(entry["shards"]):
            assert shard["file"] == f"{part}-{index:06d}.tar"
            data = (out / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]  # independent of verify_shards
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [shards.MANIFEST] + [s["file"] for e in manifest["splits"].values() for s in e["shards"]])
    shards.verify_shards(out)


@pytest.mark.parametrize("split", sorted(EXPECTED))
def test_source_checksums_recorded(packed, omniglot_source, split):
    recorded = shards.load_manifest(packed(split))["source"]
    sums = dict(line.split()[::-1] for line in (omniglot_source / "SHA256SUMS").read_text().splitlines())
    assert set(recorded) == set(omniglot.SPLIT_ARCHIVES[split])
    for name, record in recorded.items():
        assert record["kind"] == "zip" and record["sha256"] == sums[f"{name}.zip"]
        assert record["official_md5"] is False  # the shared copy is re-packed (see its README)
        assert re.fullmatch(r"[0-9a-f]{64}", record["content_sha256"])


def test_parts_follow_the_split_definitions(packed):
    ids = {split: {part: part_ids(packed(split), part) for part in omniglot.PARTS} for split in EXPECTED}
    for split, parts in ids.items():
        flat = [i for part in parts.values() for i in part]
        assert len(flat) == len(set(flat)), f"{split}: a character is in two parts"
    lake = ids["lake"]
    assert set(lake["test"]) == set(range(965, 1624))  # images_evaluation ids
    assert set(lake["train"]) | set(lake["val"]) == set(range(1, 965))
    assert {i for p in ids["vinyals"].values() for i in p} == set(range(1, 1624))
    futurama = ids["futurama"]
    assert set(futurama["test"]) == FUTURAMA_IDS
    assert set(futurama["train"]) | set(futurama["val"]) == set(range(1, 965)) - FUTURAMA_IDS


def test_class_metadata_and_pixels(packed, omniglot_source):
    pool = shards.load_class_pool(packed("futurama"), "test")
    first = pool.classes[0]
    assert first == {"alphabet": "Futurama", "character": "character01", "id": 325,
                     "drawers": list(range(1, 21)), "archive": "images_background",
                     "split": "futurama", "part": "test"}
    assert pool.images.shape == (26, 20, 28, 28)
    # Strokes bright on dark: most pixels are background (0), strokes reach 255.
    assert pool.images.max() == 255 and pool.images.float().mean() < 64
    with zipfile.ZipFile(omniglot_source / "images_background.zip") as archive:
        png = archive.read("images_background/Futurama/character01/0325_01.png")
    original = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    full = omniglot._decode_drawing(png, 105, where="test")
    np.testing.assert_array_equal(full, 255 - original)  # 105: inverted, otherwise untouched
    np.testing.assert_array_equal(pool.images[0, 0].numpy(), omniglot._decode_drawing(png, 28, where="test"))


def test_two_packs_are_byte_identical(packed, omniglot_source, tmp_path):
    first = packed("futurama")
    omniglot.clear_decode_cache()  # decode again from the zips: nothing shared with the first pack
    second = shards.pack_omniglot(omniglot_source, "futurama", tmp_path / "again", download=False)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_sample_keys_have_no_dots_and_are_unique(packed):
    manifest = shards.load_manifest(packed("vinyals"))
    keys = []
    for part in omniglot.PARTS:
        for path in shards.shard_files(packed("vinyals"), part, manifest):
            keys += [s["__key__"] for s in shards.read_shard(path)]
    assert len(keys) == 1623 == len(set(keys))
    assert not any("." in key for key in keys)


def test_incomplete_source_names_what_is_missing(omniglot_source, tmp_path):
    """Drop an alphabet, a character and two drawings; the error lists exactly those."""
    dropped = ("images_background/Korean/", "images_background/Latin/character07/",
               "images_background/Braille/character01/0192_03.png",
               "images_background/Braille/character01/0192_19.png")
    with zipfile.ZipFile(omniglot_source / "images_background.zip") as src, \
            zipfile.ZipFile(tmp_path / "images_background.zip", "w") as dst:
        for info in src.infolist():
            if not info.filename.startswith(dropped):
                dst.writestr(info, src.read(info))
    with pytest.raises(omniglot.OmniglotSourceError) as caught:
        shards.pack_omniglot(tmp_path, "futurama", tmp_path / "out", download=False)
    message = str(caught.value)
    assert "alphabet Korean (40 characters) is missing" in message
    assert "Latin/character07 is missing" in message
    assert "Braille/character01 is missing drawings 03, 19" in message
    assert message.count("\n  - ") == 3
    assert not (tmp_path / "out").exists()


def test_extracted_folder_reads_like_the_zip(omniglot_source, tmp_path):
    with zipfile.ZipFile(omniglot_source / "images_evaluation.zip") as archive:
        archive.extractall(tmp_path)
    folder = omniglot.resolve_source(tmp_path, download=False, archives=(omniglot.EVALUATION,))
    from_folder = omniglot._ArchiveReader(folder / omniglot.EVALUATION, omniglot.EVALUATION)
    from_zip = omniglot._ArchiveReader(omniglot_source / "images_evaluation.zip", omniglot.EVALUATION)
    members = from_zip.png_members()
    assert from_folder.png_members() == members
    assert omniglot.list_characters(members, omniglot.EVALUATION) == \
        omniglot.list_characters(from_folder.png_members(), omniglot.EVALUATION)
    assert all(from_folder.read(m) == from_zip.read(m) for m in members[::997])
    from_zip.close()
    with pytest.raises(omniglot.OmniglotSourceError, match="Korean"):
        omniglot.list_characters(from_folder.png_members(), omniglot.BACKGROUND)


def test_missing_source_and_md5_errors(tmp_path, monkeypatch):
    with pytest.raises(omniglot.OmniglotSourceError, match="does not exist"):
        omniglot.resolve_source(tmp_path / "nowhere", download=False)
    with pytest.raises(omniglot.OmniglotSourceError, match="images_evaluation.zip"):
        omniglot.resolve_source(tmp_path, download=False)
    monkeypatch.setenv("FSL_DATA_HOME", str(tmp_path))
    with pytest.raises(omniglot.OmniglotSourceError, match="downloading is off"):
        omniglot.resolve_source(None, download=False)
    fake = tmp_path / "omniglot" / "images_background.zip"
    fake.parent.mkdir()
    fake.write_bytes(b"not the official zip")
    with pytest.raises(omniglot.OmniglotSourceError, match=r"MD5 .* not the official 68d2efa1"):
        omniglot.resolve_source(None, download=False, archives=(omniglot.BACKGROUND,))


def test_bad_pack_arguments(omniglot_source, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'omniglot'.*lake, vinyals, futurama"):
        shards.pack_omniglot(omniglot_source, "omniglot", tmp_path / "x", download=False)
    with pytest.raises(ValueError, match="image size 200"):
        shards.pack_omniglot(omniglot_source, "futurama", tmp_path / "x", size=200, download=False)
    assert not (tmp_path / "x").exists()


def test_manifest_is_plain_json(packed):
    text = (packed("lake") / shards.MANIFEST).read_text()
    assert json.loads(text)["splits"]["test"]["classes"] == 659
