"""What the process holds before and after each probe: RSS (anonymous and file pages), glibc heap

    PYTHONPATH=/work/main OMP_NUM_THREADS=1 python drift.py cnn 8 none:defaults,none:tuned

Model (cnn or resnet), meta-batch, then the probes in order as LEVEL:ALLOCATOR. One process,
one malloc arena as plan_memory sets, loop one task at a time. Log section 12; the output of
session 5 is in drift_session5.log.
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
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]


def report(libc, tag: str) -> None:
    gc.collect()
    release_free_memory()
    info = libc.mallinfo2()
    sizes = {field: status_bytes(field) / MIB for field in ("VmRSS", "RssAnon", "RssFile")}
    print(f"{tag:28s} rss {sizes['VmRSS']:7.1f} anon {sizes['RssAnon']:7.1f} "
          f"file {sizes['RssFile']:7.1f} heap {info.arena / MIB:7.1f} "
          f"inuse {info.uordblks / MIB:7.1f} free {info.fordblks / MIB:7.1f} "
          f"mmap {info.hblkhd / MIB:6.1f} ({info.hblks})", flush=True)


def main() -> None:
    model_name, meta_batch, order = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    libc = _libc()
    libc.mallinfo2.restype = MallInfo2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": meta_batch}
    model = build_model(model_name, 5)
    tasks = synthetic_tasks(case, "cpu")
    cfg = case_config(case, 10.0)
    state = bench_state(cfg, model)
    single_arena()
    report(libc, "start")
    prober = Prober(state, tasks, cfg, "no", Distributed())
    for level, malloc in (item.split(":") for item in order.split(",")):
        plan = Plan(False, 1, level, malloc)
        probe = prober([plan])[0]
        print(f"  {plan.name}: before {probe.before / MIB:.1f} peak {probe.peak / MIB:.1f} "
              f"{probe.seconds:.2f}s")
        report(libc, f"after {level}/{malloc}")


if __name__ == "__main__":
    main()
