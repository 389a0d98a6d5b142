"""Hand back the library code pages that a memory plan's probes paged in (Linux).

A probe runs code that training under another plan never runs (tasks side by side, a
checkpoint level's recomputation, the kernels of another thread count); its pages of libtorch
stay mapped in the process and count in its resident set, so training would carry them
(docs/benchmarks/2026-12-05-memory-plan.md, section 24). ``ResidentCode.release`` drops from
this process's page tables the clean pages of read-only file mappings (code and constants of
the libraries) that became resident since the snapshot. That is ``madvise(MADV_DONTNEED)``, which
for such a page does what the kernel itself does under memory pressure: the next use reads it
back from the page cache, unchanged. Pages a write has copied (relocations) are anonymous and
never dropped.
"""

from __future__ import annotations

import ctypes
import mmap
import platform

import numpy as np

PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4
# /proc/self/pagemap: bit 63 "present", bit 61 "file page or shared anonymous"
PRESENT_FILE = np.uint64((1 << 63) | (1 << 61))
READ_ONLY_PRIVATE = ("r-xp", "r--p")

Mapping = tuple[int, int, str]  # start, end, path


def read_only_file_mappings() -> list[Mapping]:
    """The process's private read-only mappings of files (libraries' code and constants)."""
    mappings = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[1] in READ_ONLY_PRIVATE and fields[5][0] == "/":
                start, end = (int(address, 16) for address in fields[0].split("-"))
                mappings.append((start, end, fields[5].rstrip("\n")))
    return mappings


def resident_file_pages(mappings: list[Mapping]) -> dict[Mapping, np.ndarray]:
    """For each mapping, which of its pages are resident and still the file's own."""
    resident = {}
    with open("/proc/self/pagemap", "rb") as pagemap:
        for start, end, path in mappings:
            pagemap.seek(start // PAGE * 8)
            entries = np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=np.uint64)
            resident[(start, end, path)] = (entries & PRESENT_FILE) == PRESENT_FILE
    return resident


def _runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) of each run of True in ``pages``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], pages.view(np.int8), [0]))))
    return [(int(first), int(last - first)) for first, last in zip(edges[::2], edges[1::2])]


class ResidentCode:
    """The library pages resident now; ``release()`` drops those paged in since. Does nothing
    where the process cannot read its own page map (not Linux, a restricted /proc)."""

    def __init__(self):
        self.before: dict[Mapping, np.ndarray] | None = None
        if platform.system() == "Linux":
            try:
                self.before = resident_file_pages(read_only_file_mappings())
            except OSError:
                self.before = None

    def release(self) -> int:
        """Drop the pages of read-only file mappings made resident since the snapshot (of
        libraries loaded since, all of theirs); returns the bytes dropped."""
        if self.before is None:
            return 0
        try:
            now = resident_file_pages(read_only_file_mappings())
        except OSError:
            return 0
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        dropped = 0
        for mapping, resident in now.items():
            earlier = self.before.get(mapping)
            new = resident if earlier is None else resident & ~earlier
            for first, count in _runs(new):
                # a refusal (a locked page, say) leaves that run resident: nothing is lost
                if libc.madvise(mapping[0] + first * PAGE, count * PAGE, MADV_DONTNEED) == 0:
                    dropped += count * PAGE
        return dropped
