"""Packing never deletes what fsl_dist did not write (issue 38): `--out` is replaced only when it
is absent, empty or a shard set and nothing else, and an `--out` that is, holds or lies inside
the source is refused before an image is read, in one line with exit code 2. Also: the files
operating systems leave in class folders are skipped, and a shard that disappears under a
streaming run is named in one line (the rows of tests/faults.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from faults import BY_KEY
from PIL import Image

from fsl_dist import exits
from fsl_dist.data import benchmarks, episodes, folder, pack_cli, shards
from fsl_dist.data.episodes import TaskSpec

from launching import run

CLASSES = ("cat", "dog", "fish")
PACK = ["--size", "28", "--channels", "3", "--fractions", "0.34,0.33,0.33", "--quiet"]


def write_images(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """3 classes x ``per_class`` random 28x28 PNGs: a user's image folder."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


def snapshot(top: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``top``, by relative path."""
    return {p.relative_to(top).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(top.rglob("*"))}


def one_error_line(stderr: str, key: str) -> str:
    """The single `error:` line of fault ``key``, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert BY_KEY[key].seen in lines[0], stderr
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("source") / "my-images")


@pytest.fixture
def earlier_set(images, tmp_path) -> Path:
    """A shard set packed from ``images``, at tmp_path/set."""
    assert pack_cli.main(["folder", str(images), "--out", str(tmp_path / "set"), *PACK]) == 0
    return tmp_path / "set"


# ----------------------------------------------------------------------------- as the user does


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A user's folder: my-images/ (3 classes x 4 PNGs) beside a thesis draft."""
    base = tmp_path_factory.mktemp("workspace")
    write_images(base / "my-images")
    (base / "thesis.tex").write_text("\\chapter{Results}\nnot backed up anywhere else\n")
    return base


@pytest.mark.integration
@pytest.mark.parametrize("key, out", [
    ("pack_out_is_source", "my-images"),
    ("pack_out_holds_source", "."),
    ("pack_out_in_source", "my-images/shards"),
])
def test_an_out_that_is_holds_or_lies_in_the_source_is_refused_and_nothing_changes(
        workspace, key, out):
    before = snapshot(workspace)
    result = run("pack.py", ["folder", "my-images", "--out", out, *PACK], check=False,
                 cwd=workspace)
    assert result.returncode == BY_KEY[key].code == 2, result.stderr
    line = one_error_line(result.stderr, key)
    assert "nothing was packed" in line and "my-images-shards" in line  # what to do instead
    assert snapshot(workspace) == before
    assert len(before) == 1 + 3 + 3 * 4 + 1  # my-images, its classes and images, the thesis


# ----------------------------------------------------------------------------- the command line


def test_a_shard_set_beside_a_users_file_is_refused_and_kept(earlier_set, images, capsys):
    (earlier_set / "notes.txt").write_text("my notes on this set")
    before = snapshot(earlier_set.parent)
    assert pack_cli.main(["folder", str(images), "--out", str(earlier_set), *PACK]) == 2
    line = one_error_line(capsys.readouterr().err, "pack_out_foreign")
    assert f"output folder {earlier_set} holds 1 file that is not" in line
    assert "(notes.txt)" in line
    assert snapshot(earlier_set.parent) == before


def test_re_packing_over_a_shard_set_replaces_it(earlier_set, images, capsys):
    (earlier_set / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # Finder looked at it
    old = shards.load_manifest(earlier_set)
    args = ["folder", str(images), "--out", str(earlier_set), *PACK, "--seed", "1"]
    assert pack_cli.main(args) == 0
    assert f"into {earlier_set}" in capsys.readouterr().out
    new = shards.verify_shards(earlier_set)
    assert (old["seed"], new["seed"]) == (0, 1)
    assert sorted(p.name for p in earlier_set.iterdir()) == [
        "manifest.json", "test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert [p.name for p in earlier_set.parent.iterdir()] == ["set"]  # no .old-, no .tmp-


@pytest.mark.parametrize("junk", [(), ("Thumbs.db", ".DS_Store")], ids=["empty", "os-junk"])
def test_packing_into_an_empty_folder_works(images, tmp_path, junk):
    out = tmp_path / "shards"
    out.mkdir()
    for name in junk:
        (out / name).write_bytes(b"left by the file manager")
    assert pack_cli.main(["folder", str(images), "--out", str(out), *PACK]) == 0
    assert shards.verify_shards(out)["splits"]["train"]["classes"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]  # the old folder is gone, whole


# ----------------------------------------------------------------------------- the check itself


def test_absent_empty_and_shard_set_destinations_pass(earlier_set, tmp_path):
    (tmp_path / "empty").mkdir()
    old = tmp_path / "old-format"  # a set of an earlier format: re-packing it is the fix
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "fsl_dist/omniglot-shards"}))
    (old / "train-000000.tar").write_bytes(b"")
    for path in (tmp_path / "absent", tmp_path / "empty", earlier_set, old):
        shards.check_destination(path)


def _set_plus(name: str, make):
    def build(earlier: Path) -> Path:
        make(earlier / name)
        return earlier
    return build


def _folder_of(*names: str):
    def build(earlier: Path) -> Path:
        out = earlier.parent / "documents"
        out.mkdir()
        for name in names:
            (out / name).write_text(name)
        return out
    return build


def _no_manifest(earlier: Path) -> Path:
    (earlier / "manifest.json").unlink()
    return earlier


def _foreign_manifest(earlier: Path) -> Path:
    (earlier / "manifest.json").write_text(json.dumps({"format": "someone-elses", "splits": {}}))
    return earlier


@pytest.mark.parametrize("build, message", [
    (_set_plus("notes", Path.mkdir), r"holds 1 folder that is not part of a shard set \(notes/\)"),
    (_set_plus("__MACOSX", Path.mkdir), r"holds 1 folder .*\(__MACOSX/\)"),  # only junk *files* go
    (_set_plus("train-000009.tar", lambda p: p.mkdir()), r"\(train-000009\.tar/\)"),
    (_set_plus("val-000009.tar", lambda p: p.symlink_to("manifest.json")),
     r"\(val-000009\.tar\)"),
    (_no_manifest, r"holds 3 files that are not part .*\(test-000000\.tar, train-000000\.tar, "),
    (_foreign_manifest, r"holds 4 files that are not part .*\(manifest\.json, test-"),
    (_folder_of("a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "f.txt"),
     r"holds 6 files that are not .*\(a\.txt, b\.txt, c\.txt, d\.txt, \.\.\. \(2 more\)\)"),
], ids=["set+folder", "set+junk-named-folder", "set+folder-named-as-a-shard",
        "set+link-named-as-a-shard", "shards-without-manifest", "someone-elses-manifest",
        "documents"])
def test_anything_but_a_shard_set_is_refused_naming_what_is_there(earlier_set, build, message):
    out = build(earlier_set)
    before = snapshot(out)
    with pytest.raises(shards.ShardError, match=message + r".*packing replaces the whole "
                       r"folder, so nothing was packed: pass a new or empty folder"):
        shards.check_destination(out)
    assert snapshot(out) == before


def test_a_file_a_link_or_the_current_folder_as_destination_is_refused(earlier_set, tmp_path,
                                                                         monkeypatch):
    (tmp_path / "file").write_text("a user's file")
    (tmp_path / "link").symlink_to(earlier_set)
    with pytest.raises(shards.ShardError, match=r"file is a file, not a folder"):
        shards.check_destination(tmp_path / "file")
    with pytest.raises(shards.ShardError, match=rf"link is a symbolic link \(to {earlier_set}\)"):
        shards.check_destination(tmp_path / "link")
    monkeypatch.chdir(earlier_set)  # a shard set, but renaming it would pull it from under you
    with pytest.raises(shards.ShardError, match=r"output folder \. is the current folder; .*"
                                                r"e\.g\. shards$"):
        shards.check_destination(".")


@pytest.mark.parametrize("out, where", [
    ("src", "is the source folder"),
    ("src/cat/shards", "is inside the source folder"),
    (".", "holds the source folder"),
])
def test_a_destination_that_is_holds_or_lies_in_the_source_is_refused(tmp_path, out, where):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    link = tmp_path / "alias"  # the same folder by another name is the same folder
    link.symlink_to(tmp_path / "src")
    for source in (tmp_path / "src", link):
        with pytest.raises(shards.ShardError, match=rf"{where}.*e\.g\. .*src-shards|{where}.*"
                                                    r"alias-shards"):
            shards.check_destination(tmp_path / out, source)
    shards.check_destination(tmp_path / "src-shards", tmp_path / "src")  # beside it: fine


def test_every_packer_checks_the_destination_before_reading(tmp_path):
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.tex").write_text("draft")
    nowhere = tmp_path / "nowhere"  # would fail later, when read: the destination fails first
    packers = [
        lambda: folder.pack_folder(nowhere, out, quiet=True),
        lambda: shards.pack_omniglot(nowhere, "futurama", out, download=False, quiet=True),
        *[lambda name=name: benchmarks.pack_benchmark(name, nowhere, out, quiet=True)
          for name in benchmarks.BENCHMARKS],
    ]
    for pack in packers:
        with pytest.raises(shards.ShardError, match=r"documents holds 1 file .*\(thesis\.tex\)"):
            pack()
    assert snapshot(out) == {"thesis.tex": b"draft"}


def test_a_file_that_appears_while_packing_is_kept_and_the_set_not_swapped(earlier_set):
    """Packing takes a while: the destination is checked again just before the swap."""
    before = snapshot(earlier_set)
    note = earlier_set / "notes.txt"

    def user_saves_a_file(_images):
        note.write_text("saved while packing")

    entries = {part: [shards.ClassEntry(part, {"id": i},
                                        lambda: np.zeros((2, 3, 28, 28), np.uint8))]
               for i, part in enumerate(shards.PARTS)}
    header = {"dataset": "folder", "channels": 3, "image_size": 28, "split_source": {}}
    with pytest.raises(shards.ShardError, match=r"\(notes\.txt\)"):
        shards.write_shard_set(earlier_set, entries, header, classes_per_shard=1,
                               on_class=user_saves_a_file)
    assert snapshot(earlier_set) == {**before, "notes.txt": b"saved while packing"}
    assert [p.name for p in earlier_set.parent.iterdir()] == ["set"]  # its staging is gone


def test_a_dead_packs_staging_loses_only_what_a_packer_writes(earlier_set, images):
    dead = _a_pid_not_running()
    stagings = [earlier_set.parent / f".set.tmp-{pid}" for pid in (dead, dead + 1)]
    for staging in stagings:
        staging.mkdir()
        (staging / "train-000000.tar").write_bytes(b"half a shard")
    (stagings[1] / "mine.txt").write_text("someone put this here")
    assert pack_cli.main(["folder", str(images), "--out", str(earlier_set), *PACK]) == 0
    assert not stagings[0].exists()
    assert snapshot(stagings[1]) == {"mine.txt": b"someone put this here"}


def _a_pid_not_running() -> int:
    for pid in range(4_000_000, 3_000_000, -2):
        if not shards._process_alive(pid) and not shards._process_alive(pid + 1):
            return pid
    pytest.skip("no free PID pair found")


# ----------------------------------------------------------------------------- OS junk


@pytest.mark.parametrize("name, junk", [
    ("Thumbs.db", True), ("THUMBS.DB", True), ("desktop.ini", True), ("Desktop.ini", True),
    (".DS_Store", True), ("._00.png", True), ("ehthumbs.db", True), ("__MACOSX", True),
    ("$RECYCLE.BIN", True), ("System Volume Information", True),
    ("thumbs.png", False), ("train-000000.tar", False), ("notes.txt", False),
])
def test_os_junk_is_told_by_name(name, junk):
    assert shards.is_os_junk(name) is junk


def test_os_junk_in_class_folders_is_skipped(images, tmp_path, capsys):
    root = shutil.copytree(images, tmp_path / "from-windows-and-mac")
    for name in CLASSES:
        (root / name / "Thumbs.db").write_bytes(os.urandom(64))  # not an image Pillow opens
        (root / name / "desktop.ini").write_text("[.ShellClassInfo]\n")
        (root / name / "._00.png").write_bytes(b"\0\5\26\7AppleDouble")  # not a PNG either
        (root / name / ".hidden.png").write_bytes(b"")
    (root / "Thumbs.db").write_bytes(b"")
    (root / "__MACOSX" / "cat").mkdir(parents=True)  # unzipped on a Mac: not a class
    (root / "__MACOSX" / "cat" / "._00.png").write_bytes(b"\0\5\26\7")
    code = pack_cli.main(["folder", str(root), "--out", str(tmp_path / "out"), *PACK])
    assert code == BY_KEY["pack_os_junk"].code
    assert BY_KEY["pack_os_junk"].seen in capsys.readouterr().out
    manifest = shards.verify_shards(tmp_path / "out")
    assert [manifest["splits"][part]["images_per_class"] for part in shards.PARTS] == [[4]] * 3


# ----------------------------------------------------------------------------- stream mode


def test_a_shard_that_disappears_from_a_streaming_run_is_named_in_one_line(packed, tmp_path):
    """The reader a stream-mode trainer iterates: its shards deleted after the start."""
    shard_dir = shutil.copytree(packed("futurama"), tmp_path / "set")
    stream = episodes.make_tasks(shard_dir, "train", TaskSpec(5, 1, 1), seed=0, mode="stream",
                                 tasks_per_batch=2, batches=10**6, rank=0, world=1,
                                 shuffle_buffer=4)
    batches = iter(stream)
    next(batches)
    for shard in shard_dir.glob("train-*.tar"):
        shard.unlink()
    with pytest.raises(shards.ShardError) as caught:
        for _ in range(10**4):
            next(batches)
    message = str(caught.value)
    assert exits.exit_code(caught.value) == BY_KEY["stream_shard_gone"].code == 2
    assert BY_KEY["stream_shard_gone"].seen in message and "\n" not in message
    assert message.startswith(f"shard {shard_dir}/train-0")
    assert message.endswith(f"re-pack the set at {shard_dir}, then continue with --resume auto")
