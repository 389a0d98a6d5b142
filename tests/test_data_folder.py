"""The folder packer: ImageFolder layouts of mixed formats, modes and sizes into shards; the resize
policy; splits from a file or fractions; every bad input named; Omniglot as a folder."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fsl_dist.data import episodes, folder, pack_cli, shards
from fsl_dist.data.episodes import TaskSpec

from image_folders import LAYOUT, write_folder, write_omniglot_folder

SIZE = 16
SPLIT = {"train": ["alpha", "delta", "eps", "gamma"], "val": ["beta"], "test": ["kappa"]}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images") / "root")


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "split.json"
    path.write_text(json.dumps(SPLIT))
    return path


@pytest.fixture(scope="module")
def packed_folder(image_folder, split_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "set"
    return folder.pack_folder(image_folder, out, size=SIZE, channels=3, split_file=split_file,
                              classes_per_shard=2, quiet=True)


def test_manifest_and_pools_hold_every_class_with_its_count(packed_folder, split_file):
    manifest = shards.verify_shards(packed_folder)
    assert manifest["dataset"] == "folder" and manifest["rotate"] is False
    assert manifest["channels"] == 3 and manifest["image_size"] == SIZE
    assert manifest["split_source"]["kind"] == "file"
    assert manifest["split_source"]["file"] == "split.json"
    for part, names in SPLIT.items():
        pool = shards.load_class_pool(packed_folder, part)
        assert [c["name"] for c in pool.classes] == names
        assert pool.counts.tolist() == [LAYOUT[n][0] for n in names]
        assert manifest["splits"][part]["images_per_class"] == pool.counts.tolist()
        assert pool.images.shape == (sum(pool.counts), 3, SIZE, SIZE)


def expected_pixels(path, size=SIZE, mode="RGB") -> np.ndarray:
    """The resize policy written out by hand: shorter side to `size`, then the centre square;
    [C, size, size]."""
    image = Image.open(path).convert(mode)
    width, height = image.size
    new = (round(width * size / min(width, height)), round(height * size / min(width, height)))
    new = (max(new[0], size), max(new[1], size))
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    resized = image.resize(new, Image.Resampling.BILINEAR)
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)))
    return pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)


@pytest.mark.parametrize("name", ["alpha", "delta", "eps"])
def test_images_follow_the_resize_policy(packed_folder, image_folder, name):
    part = next(p for p, names in SPLIT.items() if name in names)
    pool = shards.load_class_pool(packed_folder, part)
    index = [c["name"] for c in pool.classes].index(name)
    for i, path in enumerate(sorted((image_folder / name).iterdir())):
        np.testing.assert_array_equal(pool.class_images(index)[i].numpy(), expected_pixels(path))


def test_transparent_pixels_are_white(packed_folder):
    pool = shards.load_class_pool(packed_folder, "train")
    gamma = pool.class_images([c["name"] for c in pool.classes].index("gamma")).numpy()
    # 33x21 -> 25x16, crop from column 4: the transparent half is columns 0..12 of the resize
    assert (gamma[:, :, :, :7] == 255).all()


def test_two_packs_are_byte_identical(packed_folder, image_folder, split_file, tmp_path):
    again = folder.pack_folder(image_folder, tmp_path / "again", size=SIZE, channels=3,
                               split_file=split_file, classes_per_shard=2, quiet=True)
    names = sorted(p.name for p in packed_folder.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (packed_folder / name).read_bytes(), name


def test_a_csv_split_file_gives_the_same_set(packed_folder, image_folder, tmp_path):
    csv_file = tmp_path / "split.csv"
    rows = [f"{name},{part}" for part, names in SPLIT.items() for name in reversed(names)]
    csv_file.write_text("class,part\n" + "\n".join(rows) + "\n")
    again = folder.pack_folder(image_folder, tmp_path / "csv", size=SIZE, channels=3,
                               split_file=csv_file, classes_per_shard=2, quiet=True)
    for part in SPLIT:
        for a, b in zip(shards.shard_files(packed_folder, part), shards.shard_files(again, part)):
            assert a.read_bytes() == b.read_bytes()


def test_small_classes_are_never_drawn_for_large_tasks(packed_folder):
    tasks = episodes.make_tasks(packed_folder, "train", TaskSpec(3, 2, 2), seed=0)
    pool = tasks.pool
    small = [c["name"] for c, n in zip(pool.classes, pool.counts) if n < 4]
    assert small == ["eps"]
    drawn = tasks.indices(0, range(50)).classes
    assert set(drawn.ravel()) == {i for i, n in enumerate(pool.counts) if n >= 4}
    batch = tasks.batch(0, range(4))
    assert batch["support_x"].shape == (4, 6, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"only 2 of the 4 classes of part 'train'"):
        episodes.make_tasks(packed_folder, "train", TaskSpec(3, 3, 3), seed=0, mode="stream",
                            tasks_per_batch=2, batches=1)


def test_fractions_give_a_seeded_split_of_every_class(tmp_path):
    layout = {f"c{i:02d}": (2, "RGB", "png", 9, 9) for i in range(10)}
    root = write_folder(tmp_path / "ten", layout)
    parts = {}
    for seed in (0, 0, 1):
        out = folder.pack_folder(root, tmp_path / f"s{seed}", size=8, seed=seed, quiet=True)
        manifest = shards.load_manifest(out)
        assert manifest["split_source"] == {"kind": "fractions", "fractions": [0.64, 0.16, 0.2],
                                            "seed": seed}
        names = {part: [c["name"] for c in shards.load_class_pool(out, part).classes]
                 for part in shards.PARTS}
        assert [len(names[p]) for p in shards.PARTS] == [6, 2, 2]
        assert sorted(sum(names.values(), [])) == sorted(layout)
        parts.setdefault(seed, names)
        assert parts[seed] == names  # the same seed, the same split
    assert parts[0] != parts[1]


def test_grayscale_images_pack_to_one_channel(tmp_path):
    root = write_folder(tmp_path / "gray", {"a": (3, "L", "png", 10, 12),
                                            "b": (2, "L", "png", 9, 9),
                                            "c": (2, "1", "png", 9, 9)})
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))
    out = folder.pack_folder(root, tmp_path / "out", size=8, split_file=split, quiet=True)
    assert shards.load_manifest(out)["channels"] == 1
    train = shards.load_class_pool(out, "train")
    assert train.images.shape == (3, 1, 8, 8)
    for i, path in enumerate(sorted((root / "a").iterdir())):
        np.testing.assert_array_equal(train.images[i].numpy(), expected_pixels(path, 8, "L"))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_folder(image_folder, tmp_path):
    """A private copy of the synthetic folder, free to damage."""
    return shutil.copytree(image_folder, tmp_path / "root")


def pack_into_existing(root, earlier, tmp_path, split):
    """Pack `root` over a copy of the set `earlier`; returns that copy, to prove it survives."""
    out = shutil.copytree(earlier, tmp_path / "out")
    split_path = tmp_path / "split.json"
    split_path.write_text(json.dumps(split))
    return out, lambda: folder.pack_folder(root, out, size=SIZE, channels=3,
                                           split_file=split_path, quiet=True)


@pytest.mark.parametrize("damage, split, message", [
    (lambda r: (r / "beta" / "002.jpeg").write_bytes(b"not a jpeg"), SPLIT,
     r"cannot read image .*beta/002\.jpeg .*replace or remove the file"),
    (lambda r: (r / "empty").mkdir(), SPLIT,
     r"class folder .*/empty holds no images"),
    (lambda r: None, {**SPLIT, "test": ["kappa", "omega"]},
     r"names class 'omega' \(test\) but .* has no folder 'omega'"),
    (lambda r: None, {**SPLIT, "test": ["kappa", "alpha"]},
     r"puts class 'alpha' in train and in test; each class belongs to one part"),
    (lambda r: None, {**SPLIT, "val": []},
     r"leaves part 'val' with no classes"),
], ids=["corrupt-image", "empty-class", "unknown-class", "duplicate-class", "empty-part"])
def test_bad_input_is_named_and_the_earlier_set_survives(bad_folder, packed_folder, tmp_path,
                                                         damage, split, message):
    damage(bad_folder)
    out, pack = pack_into_existing(bad_folder, packed_folder, tmp_path, split)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(folder.FolderSourceError, match=message) as caught:
        pack()
    assert "\n" not in str(caught.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "root", "split.json"]


def test_fractions_that_leave_a_part_empty_are_refused(tmp_path):
    root = write_folder(tmp_path / "two", {"a": (2, "RGB", "png", 9, 9),
                                           "b": (2, "RGB", "png", 9, 9)})
    with pytest.raises(folder.FolderSourceError, match=r"2 classes at fractions .* leaves part "):
        folder.pack_folder(root, tmp_path / "out", size=8, quiet=True)


def test_mixed_channels_need_channels_and_name_two_files(bad_folder, tmp_path, split_file):
    Image.new("L", (20, 20), 7).save(bad_folder / "kappa" / "gray.png")
    with pytest.raises(folder.FolderSourceError,
                       match=r"mix channel counts: .*kappa/gray\.png is grayscale and .*alpha/"
                             r"000\.png colour; pass --channels 1 or --channels 3"):
        folder.pack_folder(bad_folder, tmp_path / "out", size=SIZE, split_file=split_file,
                           quiet=True)
    out = folder.pack_folder(bad_folder, tmp_path / "out", size=SIZE, split_file=split_file,
                             channels=1, quiet=True)
    assert shards.load_class_pool(out, "test").images.shape == (6, 1, SIZE, SIZE)


def test_the_command_line_packs_a_folder_and_reports_errors_in_one_line(image_folder, split_file,
                                                                         tmp_path, capsys):
    out = tmp_path / "cli"
    code = pack_cli.main(["folder", str(image_folder), "--out", str(out), "--split-file",
                          str(split_file), "--size", str(SIZE), "--channels", "3"])
    assert code == 0 and "train 4 classes" in capsys.readouterr().out
    assert shards.load_manifest(out)["channels"] == 3
    code = pack_cli.main(["folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "nowhere does not exist" in error


# ----------------------------------------------------------------------------- Omniglot


@pytest.fixture(scope="module")
def futurama_folder(omniglot_source, tmp_path_factory):
    """The 26 Futurama characters of the official zip as an image folder (its PNGs, unchanged)."""
    return write_omniglot_folder(omniglot_source, tmp_path_factory.mktemp("futurama") / "root",
                                 {"Futurama"})


def futurama_split(tmp_path):
    names = [f"character{i:02d}" for i in range(1, 27)]
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": names[:16], "val": names[16:20], "test": names[20:]}))
    return path


def folder_pools(out):
    pools = [shards.load_class_pool(out, part) for part in shards.PARTS]
    return {c["name"]: pool.class_images(i) for pool in pools for i, c in enumerate(pool.classes)}


def test_omniglot_as_a_folder_at_full_size_is_the_omniglot_packers_drawing(futurama_folder,
                                                                          tmp_path):
    """At 105x105 nothing is resized: the folder packer keeps the pixels exactly (Omniglot's
    packer inverts them, strokes bright on dark)."""
    from fsl_dist.data import omniglot

    out = folder.pack_folder(futurama_folder, tmp_path / "out", size=105,
                             split_file=futurama_split(tmp_path), quiet=True)
    assert shards.load_manifest(out)["channels"] == 1
    images = folder_pools(out)
    for name in ("character01", "character26"):
        for i, path in enumerate(sorted((futurama_folder / name).iterdir())):
            drawing = omniglot._decode_drawing(path.read_bytes(), 105, where=str(path))
            np.testing.assert_array_equal(255 - images[name][i, 0].numpy(), drawing)


def test_omniglot_as_a_folder_matches_the_omniglot_packer_within_the_resize(futurama_folder,
                                                                           packed, tmp_path):
    """At 28x28 the folder packer resizes bilinearly, Omniglot's packer with Lanczos: the class
    counts are equal and the inverted pixels differ only by the filters (bounds measured)."""
    out = folder.pack_folder(futurama_folder, tmp_path / "out", size=28,
                             split_file=futurama_split(tmp_path), quiet=True)
    images = folder_pools(out)
    reference = shards.load_class_pool(packed("futurama"), "test")  # the 26 Futurama characters
    assert sorted(images) == sorted(c["character"] for c in reference.classes)
    differences = []
    for i, meta in enumerate(reference.classes):
        ours = 255 - images[meta["character"]].numpy().astype(np.int64)
        assert ours.shape == (20, 1, 28, 28) and reference.counts[i] == 20
        differences.append(np.abs(ours - reference.class_images(i).numpy()))
    difference = np.stack(differences)
    print(f"Omniglot as folder vs Omniglot packer at 28x28: max abs difference "
          f"{difference.max()}, mean {difference.mean():.3f}")
    assert difference.mean() < 4 and difference.max() < 80
