"""Keep glibc's allocator from handing the meta-step's memory back to the kernel (CPU runs).

A second-order meta-step on CPU allocates and frees activations of several to tens of MB many
times per task. With glibc's defaults such blocks go back to the kernel (``munmap``, or a heap
trim after a large free) and come back as fresh zero-filled pages, a page fault each, on the
next allocation. Pinning the mmap threshold at glibc's maximum (32 MiB), never trimming the heap
and growing it in 1 GiB steps keeps those pages in the process: far fewer faults, faster steps
and a higher peak RSS (measured: BENCHMARKS.md, "Memory"; the probes in
docs/benchmarks/2026-11-29-epyc-avx512-bf16.md).

Applied by the trainer and the evaluator when they run on CPU, unless ``train.tune_cpu_malloc``
is false, and never over a choice the user made: any ``MALLOC_*_`` variable, malloc settings in
``GLIBC_TUNABLES`` or an ``LD_PRELOAD`` (tcmalloc, jemalloc: another allocator) leaves the
process as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt() parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = (
    (M_MMAP_THRESHOLD, 32 * 2**20),  # glibc's largest; also stops it from moving the threshold
    (M_TRIM_THRESHOLD, 2**31 - 1),   # mallopt takes an int: the largest, i.e. never trim
    (M_TOP_PAD, 2**30),              # grow the heap 1 GiB at a time (address space, not RSS)
)

# glibc's documented defaults (mallopt(3)), to switch SETTINGS off again in a running process.
# Setting them explicitly keeps glibc's dynamic mmap threshold off, so "off" in a process that
# was tuned is glibc's default values, fixed, not a fresh process's adapting threshold.
DEFAULTS = (
    (M_MMAP_THRESHOLD, 128 * 2**10),
    (M_TRIM_THRESHOLD, 128 * 2**10),
    (M_TOP_PAD, 128 * 2**10),
)


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def reason_to_leave_alone() -> str | None:
    """Why this process's allocator is not fsl_dist's to set, or None when it is."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not Linux with glibc"
    chosen = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if os.environ.get("LD_PRELOAD"):
        chosen.append("LD_PRELOAD")
    return "the environment sets " + ", ".join(chosen) if chosen else None


def tune_cpu_malloc(tuned: bool = True) -> str:
    """Apply SETTINGS (``tuned``) or glibc's DEFAULTS to this process; returns what happened,
    for the log: ``"tuned"`` (or ``"defaults"``), or why not. Idempotent; affects allocations
    from now on (forked children inherit it)."""
    reason = reason_to_leave_alone()
    if reason:
        return f"left as is: {reason}"
    libc = _libc()
    for param, value in SETTINGS if tuned else DEFAULTS:
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            return f"left partly as is: glibc refused mallopt({param}, {value})"
    return "tuned" if tuned else "defaults"


M_ARENA_MAX = -8


def single_arena() -> bool:
    """From now on every thread allocates from glibc's main arena (``MALLOC_ARENA_MAX=1``), so
    that ``release_free_memory`` reaches what worker threads freed (a thread arena's top is
    never trimmed while SETTINGS hold). The memory plan's choice; True when applied."""
    if reason_to_leave_alone() is not None:
        return False
    return _libc().mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(1)) == 1


def release_free_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc's ``malloc_trim(0)``), so that the
    process's RSS is what it holds; nothing where glibc is not the allocator."""
    if reason_to_leave_alone() is None:
        _libc().malloc_trim(ctypes.c_size_t(0))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's ``mallinfo2()`` (2.33 on), or None (another allocator, an older glibc)."""
    if reason_to_leave_alone() is not None:
        return None
    libc = _libc()
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


def heap_free_bytes() -> int | None:
    """Bytes free inside glibc's heap (``mallinfo2``'s ``fordblks``): memory the allocator can
    hand out again without growing the process's data segment, resident or not (the free pages
    ``release_free_memory`` handed back stay mapped). None without glibc 2.33's ``mallinfo2``."""
    info = _mallinfo2()
    return None if info is None else int(info.fordblks)


def grow_heap_by_default_steps() -> None:
    """glibc's default top pad (128 KiB) instead of SETTINGS' 1 GiB: the heap's address space
    then grows with what is used, so that a data-segment limit stops the allocation that goes
    past it rather than the first that reserves a GiB (``memory_plan.capped_at``)."""
    _libc().mallopt(ctypes.c_int(M_TOP_PAD), ctypes.c_int(DEFAULTS[2][1]))
