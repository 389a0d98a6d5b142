"""Library pages paged in after a snapshot are handed back, unchanged when used again; nothing
written is ever dropped (fsl_dist.code_pages)."""

import mmap
import platform

import numpy as np
import pytest

from fsl_dist.code_pages import (
    PAGE,
    ResidentCode,
    _runs,
    read_only_file_mappings,
    resident_file_pages,
)

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/pagemap")

# The kernel maps a page's cached neighbours with it (fault-around, large folios: up to 2 MiB
# here), so the pages touched lie 4 MiB apart.
PAGES, APART = 3 * 1024, 1024


@pytest.fixture
def library(tmp_path):
    """A file of PAGES distinct pages mapped privately and read-only, as a library's code is."""
    path = tmp_path / "library.so"
    path.write_bytes(b"".join(bytes([i % 251 + 1]) * PAGE for i in range(PAGES)))
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), PAGES * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    yield path, mapped
    mapped.close()


def resident_pages(path) -> np.ndarray:
    mappings = [m for m in read_only_file_mappings() if m[2] == str(path)]
    assert len(mappings) == 1, f"{path} mapped {len(mappings)} times"
    return resident_file_pages(mappings)[mappings[0]]


def touch(mapped, pages):
    return [mapped[p * PAGE] for p in pages]


def test_pages_made_resident_after_the_snapshot_are_dropped_and_read_back_unchanged(library):
    path, mapped = library
    touch(mapped, [0])
    before = resident_pages(path)
    code = ResidentCode()
    touch(mapped, [APART, 2 * APART])
    assert resident_pages(path)[[APART, 2 * APART]].all()
    assert not before[[APART, 2 * APART]].any()

    assert code.release() >= 2 * PAGE
    assert (resident_pages(path) == before).all()  # what was resident before is kept
    assert touch(mapped, range(PAGES)) == [p % 251 + 1 for p in range(PAGES)]


def test_a_library_loaded_after_the_snapshot_is_dropped_whole(tmp_path):
    code = ResidentCode()
    path = tmp_path / "late.so"
    path.write_bytes(bytes(range(256)) * (2 * PAGE // 256))
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 2 * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        touch(mapped, [0, 1])
        code.release()
        assert not resident_pages(path).any()
        assert mapped[:256] == bytes(range(256))
    finally:
        mapped.close()


def test_a_written_private_page_is_never_dropped(tmp_path):
    """Copied-on-write pages (a library's relocations) hold what the process wrote."""
    path = tmp_path / "relocated.so"
    path.write_bytes(b"\0" * PAGE)
    code = ResidentCode()
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), PAGE, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        mapped[:5] = b"moved"
        code.release()
        assert mapped[:5] == b"moved" and path.read_bytes()[:5] == b"\0" * 5
    finally:
        mapped.close()


@pytest.mark.parametrize("pages, runs", [
    ([], []), ([0, 0], []), ([1, 1, 1], [(0, 3)]), ([0, 1, 1, 0, 1], [(1, 2), (4, 1)]),
])
def test_runs_of_pages(pages, runs):
    assert _runs(np.array(pages, dtype=bool)) == runs
