"""Section 27 of the log: one bench method's steps (with Adam's update) in this process, and
beside them a thread sampling glibc's mallinfo2 every 0.5 ms: the most bytes malloc held ("in-use
peak"), the heap's high-water below its top chunk (arena - keepcost), and RssAnon / RssFile;
then the median step and the peak RSS above the start (VmHWM after clear_refs). Grown from
trim_or_channels_last.py (section 23).

    PYTHONPATH=/work/main OMP_NUM_THREADS=2 python heap_high_water.py MODEL METHOD THREADS \
        META_BATCH MALLOC STEPS VARIANT

METHOD: a bench method, or ckpt:LEVEL (one task at a time at a checkpoint level), or ckptN:LEVEL
(N tasks side by side; section 28). MALLOC: one (one arena, glibc's settings), tuned
(one arena and fsl_dist's settings, as under a budget), tunedmulti (the settings with glibc's
arenas: the default path), force / forcemulti (the same set by mallopt directly, for a process
started with GLIBC_TUNABLES, which tune_cpu_malloc leaves alone), mmN (tuned, then the mmap
threshold at N MiB), no. VARIANT: no, trim (heap trimmed before every step), cl (channels-last),
nomkldnn, keepgrad (zero_grad keeps the grads). E.g. ``cnn ckpt:none 2 8 tuned 6 no`` against
``GLIBC_TUNABLES=glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0 python heap_high_water.py
cnn ckpt:none 2 8 force 6 no``.
"""

import ctypes
import statistics
import sys
import threading
import time

import torch

from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.measure import peak_rss, reset_peak_rss
from fsl_dist.bench.peers import METHODS, fsl_dist_method
from fsl_dist.cpu_malloc import _MallInfo2, release_free_memory, single_arena, tune_cpu_malloc
from fsl_dist.models import build_model

LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = _MallInfo2
M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3
TUNED = ((M_MMAP_THRESHOLD, 32 * 2**20), (-1, 2**31 - 1), (-2, 2**30))


def set_allocator(malloc: str) -> None:
    if malloc == "one":
        single_arena()
        return
    if malloc in ("tuned", "force") or malloc.startswith("mm"):
        if malloc == "force":
            assert LIBC.mallopt(M_ARENA_MAX, 1) == 1
        else:
            single_arena()
    if malloc in ("tuned", "tunedmulti") or malloc.startswith("mm"):
        tune_cpu_malloc()
    if malloc in ("force", "forcemulti"):
        assert all(LIBC.mallopt(p, v) == 1 for p, v in TUNED)
    if malloc.startswith("mm"):
        assert LIBC.mallopt(M_MMAP_THRESHOLD, int(float(malloc[2:]) * 2**20)) == 1


def rss_kib() -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["RssAnon"].split()[0]), int(status["RssFile"].split()[0])


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        info = LIBC.mallinfo2()
        self.used0, self.top0 = info.uordblks + info.hblkhd, info.arena - info.keepcost
        self.rss0 = rss_kib()
        self.used = self.heap = 0
        self.rss = [0, 0]
        self.running = True

    def run(self):
        while self.running:
            info = LIBC.mallinfo2()
            self.used = max(self.used, info.uordblks + info.hblkhd - self.used0)
            self.heap = max(self.heap, info.arena - info.keepcost - self.top0)
            anon, file = rss_kib()
            self.rss = [max(self.rss[0], anon - self.rss0[0]),
                        max(self.rss[1], file - self.rss0[1])]
            time.sleep(0.0005)

    def line(self) -> str:
        return (f"in-use peak +{self.used / 2**20:.1f} MiB, heap high-water "
                f"+{self.heap / 2**20:.1f}, RssAnon +{self.rss[0] // 1024}, "
                f"RssFile +{self.rss[1] // 1024}")


def main(argv):
    model_name, method, threads, meta_batch, malloc, steps, variant = argv[:7]
    set_allocator(malloc)
    torch.manual_seed(0)
    torch.set_num_threads(int(threads))
    if variant == "nomkldnn":
        torch.backends.mkldnn.enabled = False
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": int(meta_batch)}
    model = build_model(model_name, 5, **model_options(case))
    if variant == "cl":
        model = model.to(memory_format=torch.channels_last)
    tasks = synthetic_tasks(case, torch.device("cpu"))
    if method.startswith("ckpt"):
        workers, level = method[4:].split(":") if method[4] != ":" else ("1", method[5:])
        backward = fsl_dist_method(vectorize=False, workers=int(workers), checkpoint=level)(
            model, tasks, case)
    else:
        backward = METHODS[method][1](model, tasks, case)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        if variant == "trim":
            release_free_memory()
        optimizer.zero_grad(set_to_none=variant != "keepgrad")
        backward()
        optimizer.step()

    sampler = Sampler()
    base = reset_peak_rss()
    sampler.start()
    step()
    print(f"  after the first step: {sampler.line()}")
    times = []
    for _ in range(int(steps)):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
        print(f"  after a step: {sampler.line()}")
    peak = (peak_rss() - base) / 2**20
    sampler.running = False
    print(f"peak {peak:.0f} MiB {model_name} {method} mb={meta_batch} malloc={malloc} "
          f"{variant}: median {statistics.median(times):.3f} s, "
          f"all {[round(t, 3) for t in times]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
