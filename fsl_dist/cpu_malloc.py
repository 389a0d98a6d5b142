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

A training process on CPU also starts under START_TUNABLES (``restart_under_start_tunables``,
called by the training commands before torch is imported): glibc reads them only when a
program starts. Without a per-thread cache (tcache) and fastbins, the small chunks that glibc
2.36's ``posix_memalign`` splits off around every tensor are merged back at once, so a freed
activation's hole stays large enough for the next tensor of its size, and the heap grows much
less beyond what a meta-step holds, at the same speed (measured: BENCHMARKS.md, "Memory";
docs/benchmarks/2026-12-05-memory-plan.md, section 27).

Or, with ``train.cpu_allocator: tcmalloc`` (and by default, ``auto``, where a memory budget
is set), it starts under gperftools' tcmalloc instead (``LD_PRELOAD``, found where torch's own
CPU launcher looks: ``tcmalloc_path``), which took one task at a time on two threads to a lower
peak and a faster step than the tuned glibc (section 28 of that log). glibc's settings then do
not apply: every function here that sets or reads them leaves a process fsl_dist started with
tcmalloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

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


# glibc's malloc variables are MALLOC_*_ but for these two
GLIBC_ARENA_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST")
# glibc tunables for the start of a CPU training process (the module's docstring says why).
START_TUNABLES = "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"
# Holds the GLIBC_TUNABLES value fsl_dist set, so that it is not taken for the user's choice.
SET_BY_FSL_DIST = "FSL_DIST_GLIBC_TUNABLES"
# The same for the LD_PRELOAD of tcmalloc (train.cpu_allocator: tcmalloc).
PRELOADED_BY_FSL_DIST = "FSL_DIST_LD_PRELOAD"
# gperftools' tcmalloc, the minimal build first (no heap profiler).
TCMALLOC_FILES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
# tcmalloc's settings where the user has none of their own: no report on stderr of every
# allocation over 1 GiB (an 84x84 run makes some); freed pages kept for the next step rather than
# handed back a few at a time and faulted in again (as glibc's SETTINGS do; planning hands them
# back itself, release_free_memory).
TCMALLOC_SETTINGS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40),
                     "TCMALLOC_RELEASE_RATE": "0"}


def reason_to_leave_alone(env=None) -> str | None:
    """Why the allocator of this process (or of one started with ``env``) is not fsl_dist's to
    set, or None when it is."""
    env = os.environ if env is None else env
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not Linux with glibc"
    if preloaded_tcmalloc(env):
        return "fsl_dist started it with tcmalloc (train.cpu_allocator)"
    chosen = sorted(k for k in env if k.startswith("MALLOC_") and k.endswith("_")
                    or k in GLIBC_ARENA_VARIABLES)
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", "") and not started_tuned(env):
        chosen.append("GLIBC_TUNABLES")
    if env.get("LD_PRELOAD"):
        chosen.append("LD_PRELOAD")
    return "the environment sets " + ", ".join(chosen) if chosen else None


def started_tuned(env=None) -> bool:
    """Whether this process (or one started with ``env``) runs under fsl_dist's START_TUNABLES."""
    env = os.environ if env is None else env
    return bool(env.get(SET_BY_FSL_DIST)) and env.get(SET_BY_FSL_DIST) == env.get("GLIBC_TUNABLES")


def preloaded_tcmalloc(env=None) -> bool:
    """Whether this process (or one started with ``env``) runs under the tcmalloc fsl_dist
    preloaded."""
    env = os.environ if env is None else env
    return bool(env.get(PRELOADED_BY_FSL_DIST)) and \
        env.get(PRELOADED_BY_FSL_DIST) == env.get("LD_PRELOAD")


def loaded_tcmalloc() -> str | None:
    """The path of the tcmalloc this process runs with (whoever preloaded it), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libtcmalloc" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


def tcmalloc_dirs(env=None) -> list[str]:
    """Where ``tcmalloc_path`` looks, in order: the environments' own lib folders, then the
    system's (as torch.backends.xeon.run_cpu does)."""
    env = os.environ if env is None else env
    prefixes = [env.get("VIRTUAL_ENV"), env.get("CONDA_PREFIX"), sys.prefix,
                os.path.expanduser("~/.local")]
    dirs = [os.path.join(p, "lib") for p in prefixes if p]
    dirs += ["/usr/local/lib", "/usr/local/lib64", f"/usr/lib/{platform.machine()}-linux-gnu",
             "/usr/lib", "/usr/lib64"]
    return list(dict.fromkeys(dirs))


def tcmalloc_path(env=None) -> str | None:
    """The first of TCMALLOC_FILES in ``tcmalloc_dirs``, or None."""
    for name in TCMALLOC_FILES:
        for folder in tcmalloc_dirs(env):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def chosen_allocator(allocator: str, budgeted: bool, env=None) -> str:
    """The malloc a CPU training process starts with for ``train.cpu_allocator`` =
    ``allocator``: "auto" is tcmalloc where a memory budget is set (``budgeted``: the budget
    rows ran lighter and faster under it, BENCHMARKS.md "Memory") and ``tcmalloc_path`` finds
    it, glibc otherwise."""
    if allocator != "auto":
        return allocator
    return "tcmalloc" if budgeted and tcmalloc_path(env) is not None else "glibc"


def start_environment(env=None, allocator: str = "glibc") -> dict | None:
    """``env`` (this process's by default) for a CPU process to start with: START_TUNABLES
    added to ``GLIBC_TUNABLES``, or with ``allocator`` "tcmalloc" that preloaded
    (``tcmalloc_path``); None where the allocator is not fsl_dist's to set, where it is set
    already, or where tcmalloc is asked for and not found (the trainer reports that)."""
    env = dict(os.environ if env is None else env)
    if started_tuned(env) or reason_to_leave_alone(env) is not None:
        return None
    if allocator == "tcmalloc":
        path = tcmalloc_path(env)
        if path is None:
            return None
        env.update({"LD_PRELOAD": path, PRELOADED_BY_FSL_DIST: path})
        for variable, value in TCMALLOC_SETTINGS.items():
            env.setdefault(variable, value)
        return env
    value = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), START_TUNABLES)))
    env.update({"GLIBC_TUNABLES": value, SET_BY_FSL_DIST: value})
    return env


def restart_under_start_tunables(allocator: str = "glibc") -> None:
    """Run this program again in this process (``execve``: the same PID, arguments and
    descriptors) under ``start_environment(allocator=allocator)``; returns at once where that
    is None, and when the kernel refuses (the process then goes on as it is)."""
    env = start_environment(allocator=allocator)
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return


def tcmalloc_missing() -> str | None:
    """Why this process does not run under the tcmalloc ``train.cpu_allocator`` asks for, in a
    line that says what to do; None where it does, or where the allocator is the user's."""
    if preloaded_tcmalloc() or reason_to_leave_alone() is not None:
        return None
    path = tcmalloc_path()
    if path is None:
        return (f"`train.cpu_allocator` = 'tcmalloc': none of {', '.join(TCMALLOC_FILES)} in "
                f"{', '.join(tcmalloc_dirs())}; install it (apt install libtcmalloc-minimal4, "
                f"or conda install gperftools) or set train.cpu_allocator=glibc")
    return (f"`train.cpu_allocator` = 'tcmalloc': this process did not start with it; train "
            f"with fsl-train, fsl-pretrain or launch/train.py (they preload it), or start "
            f"Python with LD_PRELOAD={path}")


def tune_cpu_malloc(tuned: bool = True) -> str:
    """Apply SETTINGS (``tuned``) or glibc's DEFAULTS to this process; returns what happened,
    for the log: ``"tuned"`` (or ``"defaults"``), or why not. Idempotent; affects allocations
    from now on (forked children inherit it); "tcmalloc" where fsl_dist started the process
    with tcmalloc (nothing to set)."""
    if preloaded_tcmalloc():
        return "tcmalloc"
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
    process's RSS is what it holds; under fsl_dist's tcmalloc its
    ``MallocExtension_ReleaseFreeMemory``; nothing under another allocator."""
    if preloaded_tcmalloc():
        release = getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)
        if release is not None:
            release()
    elif reason_to_leave_alone() is None:
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


# gperftools' counters of its page heap: free and resident, free and handed back (still mapped)
TCMALLOC_FREE_PROPERTIES = (b"tcmalloc.pageheap_free_bytes", b"tcmalloc.pageheap_unmapped_bytes")


def _tcmalloc_free_bytes() -> int | None:
    get = getattr(ctypes.CDLL(None), "MallocExtension_GetNumericProperty", None)
    if get is None:
        return None
    get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]
    total = 0
    for name in TCMALLOC_FREE_PROPERTIES:
        value = ctypes.c_size_t()
        if not get(name, ctypes.byref(value)):
            return None
        total += value.value
    return total


def heap_free_bytes() -> int | None:
    """Bytes free inside the heap: memory the allocator can hand out again without growing the
    process's data segment, resident or not (the free pages ``release_free_memory`` handed back
    stay mapped). glibc's ``mallinfo2`` ``fordblks`` (None before glibc 2.33); under fsl_dist's
    tcmalloc its page heap's free and unmapped bytes; None under another allocator."""
    if preloaded_tcmalloc():
        return _tcmalloc_free_bytes()
    info = _mallinfo2()
    return None if info is None else int(info.fordblks)


def grow_heap_by_default_steps() -> None:
    """glibc's default top pad (128 KiB) instead of SETTINGS' 1 GiB: the heap's address space
    then grows with what is used, so that a data-segment limit stops the allocation that goes
    past it rather than the first that reserves a GiB (``memory_plan.capped_at``)."""
    _libc().mallopt(ctypes.c_int(M_TOP_PAD), ctypes.c_int(DEFAULTS[2][1]))
