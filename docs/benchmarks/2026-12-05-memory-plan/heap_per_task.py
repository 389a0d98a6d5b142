"""Section 27 of the log: K tasks' meta-gradient (one task at a time, two threads, one arena and
fsl_dist's settings set by mallopt directly), three calls; after each, the most bytes malloc held
and the heap's high-water (arena - keepcost) above the start, sampled every 0.3 ms.

    PYTHONPATH=/work/main OMP_NUM_THREADS=2 [GLIBC_TUNABLES=...] python heap_per_task.py \
        MODEL K LEVEL [mxfast]

``mxfast``: also mallopt(M_MXFAST, 0) at run time.
"""

import ctypes
import sys
import threading
import time

import torch

from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.peers import fsl_dist_method
from fsl_dist.cpu_malloc import _MallInfo2
from fsl_dist.models import build_model

LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = _MallInfo2
SETTINGS = ((-8, 1), (-3, 32 * 2**20), (-1, 2**31 - 1), (-2, 2**30))  # one arena, then tuned
M_MXFAST = 1


def main(model_name: str, k: int, level: str, mxfast: bool) -> None:
    assert all(LIBC.mallopt(p, v) == 1 for p, v in SETTINGS)
    if mxfast:
        assert LIBC.mallopt(M_MXFAST, 0) == 1
    torch.manual_seed(0)
    torch.set_num_threads(2)
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": k}
    model = build_model(model_name, 5, **model_options(case))
    tasks = synthetic_tasks(case, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    start = LIBC.mallinfo2()
    used0, top0 = start.uordblks + start.hblkhd, start.arena - start.keepcost
    most = {"used": 0, "heap": 0, "running": True}

    def sample():
        while most["running"]:
            info = LIBC.mallinfo2()
            most["used"] = max(most["used"], info.uordblks + info.hblkhd - used0)
            most["heap"] = max(most["heap"], info.arena - info.keepcost - top0)
            time.sleep(0.0003)
    threading.Thread(target=sample, daemon=True).start()
    for call in range(3):
        optimizer.zero_grad(set_to_none=True)
        fsl_dist_method(vectorize=False, workers=1, checkpoint=level)(model, tasks, case)()
        time.sleep(0.01)
        print(f"k={k} call {call}: in-use max +{most['used'] / 2**20:.1f} "
              f"heap hw +{most['heap'] / 2**20:.1f}", flush=True)
    most["running"] = False


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], len(sys.argv) > 4)
