"""One loop plan's probe step under four settings of glibc's allocator: peak and time

    PYTHONPATH=/work/main OMP_NUM_THREADS=2 python allocators.py cnn 8 2 1 none SETTING

Model (cnn or resnet), meta-batch, intra-op threads, tasks in flight, checkpoint level, then
the allocator: tuned (fsl_dist's cpu_malloc.SETTINGS), defaults (glibc's values, fixed),
dynamic (no mallopt at all: glibc's adapting mmap threshold, as the peers run) or capped
(the mmap threshold at its 32 MiB ceiling, the heap trimmed above 64 MiB free: where glibc's
dynamic threshold ends up). Then optionally the arenas: one (default, as plan_memory sets) or
glibc (an arena per thread, glibc's default). One process; three probes of three repeats each
(fsl_dist.memory_plan.Prober). Log section 14.
"""

import ctypes
import gc
import sys

import torch

from fsl_dist.bench.cases import synthetic_tasks
from fsl_dist.bench.planned import bench_state, case_config
from fsl_dist.cpu_malloc import _libc, release_free_memory, single_arena
from fsl_dist.distributed import Distributed
from fsl_dist.memory_plan import Plan, Prober, status_bytes
from fsl_dist.models import build_model

MIB = 2**20
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    "tuned": ((M_MMAP_THRESHOLD, 32 * MIB), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**30)),
    "defaults": ((M_MMAP_THRESHOLD, 128 * 1024), (M_TRIM_THRESHOLD, 128 * 1024),
                 (M_TOP_PAD, 128 * 1024)),
    "dynamic": (),
    "capped": ((M_MMAP_THRESHOLD, 32 * MIB), (M_TRIM_THRESHOLD, 64 * MIB),
               (M_TOP_PAD, 128 * 1024)),
}


def main() -> None:
    model_name, meta_batch, threads, in_flight, level, setting = sys.argv[1:7]
    arenas = sys.argv[7] if len(sys.argv) > 7 else "one"  # "one" as plan_memory sets, or "glibc"
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    libc = _libc()
    for param, value in SETTINGS[setting]:
        assert libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": int(meta_batch)}
    model = build_model(model_name, 5)
    tasks = synthetic_tasks(case, "cpu")
    cfg = case_config(case, 10.0)
    state = bench_state(cfg, model)
    if arenas == "one":
        single_arena()
    gc.collect()
    release_free_memory()
    start = status_bytes("VmRSS")
    prober = Prober(state, tasks, cfg, "no", Distributed(), repeats=3)
    plan = Plan(False, int(in_flight), level, None)
    for _ in range(3):
        probe = prober([plan])[0]
        print(f"{model_name} mb{meta_batch} {threads} threads, {plan.name}, {setting}, "
              f"{arenas} arena(s): "
              f"peak {(probe.peak - start) / MIB:.1f} MiB above the start "
              f"({start / MIB:.0f} MiB), {probe.seconds:.3f} s", flush=True)


if __name__ == "__main__":
    main()
