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
    assert manifest["format"] == shards.FORMAT
    assert manifest["format_version"] == shards.FORMAT_VERSION
    assert manifest["dataset"] == "omniglot" and manifest["channels"] == 1
    assert manifest["split_source"] == {"kind": "named", "split": split, "seed": 0}
    assert manifest["packer"]["packer_version"] == shards.PACKER_VERSION
    for part, classes in EXPECTED[split].items():
        entry = manifest["splits"][part]
        assert entry["classes"] == classes
        assert entry["images"] == 20 * classes
        assert entry["images_per_class"] == [20] * classes
        assert len(entry["shards"]) == math.ceil(classes / shards.DEFAULT_CLASSES_PER_SHARD)
        assert sum(s["classes"] for s in entry["shards"]) == classes
        for index, shard in enumerate(entry["shards"]):
            assert shard["file"] == f"{part}-{index:06d}.tar"
            data = (out / shard["file"]).read_bytes()
            # independent of verify_shards
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [shards.MANIFEST] + [s["file"] for e in manifest["splits"].values() for s in e["shards"]])
    shards.verify_shards(out)


@pytest.mark.parametrize("split", sorted(EXPECTED))
def test_source_checksums_recorded(packed, omniglot_source, split):
    recorded = shards.load_manifest(packed(split))["source"]
    sums = dict(line.split()[::-1]
                for line in (omniglot_source / "SHA256SUMS").read_text().splitlines())
    assert set(recorded) == set(omniglot.SPLIT_ARCHIVES[split])
    for name, record in recorded.items():
        assert record["kind"] == "zip" and record["sha256"] == sums[f"{name}.zip"]
        assert record["official_md5"] is False  # the shared copy is re-packed (see its README)
        assert re.fullmatch(r"[0-9a-f]{64}", record["content_sha256"])


@pytest.mark.parametrize("split", sorted(EXPECTED))
def test_no_character_is_in_two_parts(packed, split):
    flat = [i for part in omniglot.PARTS for i in part_ids(packed(split), part)]
    assert len(flat) == len(set(flat)), f"{split}: a character is in two parts"


SPLIT_DEFINITIONS = {  # split -> {parts: the character ids they hold together}
    "lake": {("test",): set(range(965, 1624)),  # images_evaluation ids
             ("train", "val"): set(range(1, 965))},
    "vinyals": {("train", "val", "test"): set(range(1, 1624))},
    "futurama": {("test",): FUTURAMA_IDS,
                 ("train", "val"): set(range(1, 965)) - FUTURAMA_IDS},
}


@pytest.mark.parametrize("split", sorted(SPLIT_DEFINITIONS))
def test_parts_follow_the_split_definitions(packed, split):
    for parts, expected in SPLIT_DEFINITIONS[split].items():
        assert {i for part in parts for i in part_ids(packed(split), part)} == expected, parts


def test_class_metadata_and_image_shape(packed):
    pool = shards.load_class_pool(packed("futurama"), "test")
    first = pool.classes[0]
    assert first == {"alphabet": "Futurama", "character": "character01", "id": 325,
                     "drawers": list(range(1, 21)), "archive": "images_background",
                     "split": "futurama", "part": "test"}
    assert pool.images.shape == (26 * 20, 1, 28, 28)
    assert pool.counts.tolist() == [20] * 26
    assert pool.class_images(25).shape == (20, 1, 28, 28)


def test_strokes_are_bright_on_a_dark_background(packed):
    pool = shards.load_class_pool(packed("futurama"), "test")
    # Most pixels are background (0), strokes reach 255.
    assert pool.images.max() == 255 and pool.images.float().mean() < 64


def test_pixels_are_the_inverted_drawing_of_the_zip(packed, omniglot_source):
    pool = shards.load_class_pool(packed("futurama"), "test")
    with zipfile.ZipFile(omniglot_source / "images_background.zip") as archive:
        png = archive.read("images_background/Futurama/character01/0325_01.png")
    original = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    full = omniglot._decode_drawing(png, 105, where="test")
    np.testing.assert_array_equal(full, 255 - original)  # 105: inverted, otherwise untouched
    np.testing.assert_array_equal(pool.class_images(0)[0, 0].numpy(),
                                  omniglot._decode_drawing(png, 28, where="test"))


def test_two_packs_are_byte_identical(packed, omniglot_source, tmp_path):
    first = packed("futurama")
    omniglot.clear_decode_cache()  # decode again from the zips: nothing shared with the first pack
    second = shards.pack_omniglot(omniglot_source, "futurama", tmp_path / "again", download=False)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.fixture(scope="module")
def vinyals_keys(packed):
    """The sample keys of every shard of the vinyals set (read once for the tests below)."""
    manifest = shards.load_manifest(packed("vinyals"))
    keys = []
    for part in omniglot.PARTS:
        for path in shards.shard_files(packed("vinyals"), part, manifest):
            keys += [s["__key__"] for s in shards.read_shard(path)]
    return keys


def test_sample_keys_are_unique(vinyals_keys):
    assert len(vinyals_keys) == 1623 == len(set(vinyals_keys))


def test_sample_keys_have_no_dots(vinyals_keys):
    assert not any("." in key for key in vinyals_keys)


def test_incomplete_source_names_what_is_missing(omniglot_source, tmp_path):
    """Drop an alphabet, a character and two drawings; the error lists exactly those."""
    dropped = ("images_background/Korean/", "images_background/Latin/character07/",
               "images_background/Braille/character01/0192_03.png",
               "images_background/Braille/character01/0192_19.png")
    source = tmp_path / "source"  # the output folder may not lie inside it
    source.mkdir()
    with zipfile.ZipFile(omniglot_source / "images_background.zip") as src, \
            zipfile.ZipFile(source / "images_background.zip", "w") as dst:
        for info in src.infolist():
            if not info.filename.startswith(dropped):
                dst.writestr(info, src.read(info))
    with pytest.raises(omniglot.OmniglotSourceError) as caught:
        shards.pack_omniglot(source, "futurama", tmp_path / "out", download=False)
    message = str(caught.value)
    assert "alphabet Korean (40 characters) is missing" in message
    assert "Latin/character07 is missing" in message
    assert "Braille/character01 is missing drawings 03, 19" in message
    assert message.count("\n  - ") == 3
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def extracted_evaluation(omniglot_source, tmp_path_factory):
    """images_evaluation.zip extracted (once: about 13,000 files), as a user might have it."""
    folder = tmp_path_factory.mktemp("extracted")
    with zipfile.ZipFile(omniglot_source / "images_evaluation.zip") as archive:
        archive.extractall(folder)
    return folder


def test_extracted_folder_reads_like_the_zip(omniglot_source, extracted_evaluation):
    folder = omniglot.resolve_source(extracted_evaluation, download=False,
                                     archives=(omniglot.EVALUATION,))
    from_folder = omniglot._ArchiveReader(folder / omniglot.EVALUATION, omniglot.EVALUATION)
    from_zip = omniglot._ArchiveReader(omniglot_source / "images_evaluation.zip",
                                       omniglot.EVALUATION)
    members = from_zip.png_members()
    assert from_folder.png_members() == members
    assert omniglot.list_characters(members, omniglot.EVALUATION) == \
        omniglot.list_characters(from_folder.png_members(), omniglot.EVALUATION)
    assert all(from_folder.read(m) == from_zip.read(m) for m in members[::997])
    from_zip.close()


def test_an_extracted_folder_without_an_alphabet_names_it(extracted_evaluation):
    # images_evaluation read as images_background: its alphabets (Korean among them) are missing
    folder = omniglot.resolve_source(extracted_evaluation, download=False,
                                     archives=(omniglot.EVALUATION,))
    from_folder = omniglot._ArchiveReader(folder / omniglot.EVALUATION, omniglot.EVALUATION)
    with pytest.raises(omniglot.OmniglotSourceError, match="Korean"):
        omniglot.list_characters(from_folder.png_members(), omniglot.BACKGROUND)


def test_a_source_folder_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(omniglot.OmniglotSourceError, match="does not exist"):
        omniglot.resolve_source(tmp_path / "nowhere", download=False)


def test_a_source_folder_without_the_zips_names_them(tmp_path):
    with pytest.raises(omniglot.OmniglotSourceError, match="images_evaluation.zip"):
        omniglot.resolve_source(tmp_path, download=False)


def test_no_source_and_no_download_says_downloading_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FSL_DATA_HOME", str(tmp_path))
    with pytest.raises(omniglot.OmniglotSourceError, match="downloading is off"):
        omniglot.resolve_source(None, download=False)


def test_a_zip_that_is_not_the_official_one_fails_its_md5(tmp_path, monkeypatch):
    monkeypatch.setenv("FSL_DATA_HOME", str(tmp_path))
    fake = tmp_path / "omniglot" / "images_background.zip"
    fake.parent.mkdir()
    fake.write_bytes(b"not the official zip")
    with pytest.raises(omniglot.OmniglotSourceError, match=r"MD5 .* not the official 68d2efa1"):
        omniglot.resolve_source(None, download=False, archives=(omniglot.BACKGROUND,))


@pytest.mark.parametrize("split, size, message", [
    ("omniglot", 28, "unknown split 'omniglot'.*lake, vinyals, futurama"),
    ("futurama", 200, "image size 200"),
], ids=["unknown-split", "image-size-200"])
def test_bad_pack_arguments(omniglot_source, tmp_path, split, size, message):
    with pytest.raises(ValueError, match=message):
        shards.pack_omniglot(omniglot_source, split, tmp_path / "x", size=size, download=False)
    assert not (tmp_path / "x").exists()


def test_manifest_is_plain_json(packed):
    text = (packed("lake") / shards.MANIFEST).read_text()
    assert json.loads(text)["splits"]["test"]["classes"] == 659
