"""One bench method's steps in this process: median seconds and peak RSS above the start, and
with "prof" a torch profiler table of one step (section 20 of the log).

    PYTHONPATH=/work/main OMP_NUM_THREADS=2 python serial_vs_peer.py MODEL METHOD THREADS \
        META_BATCH tuned|no STEPS [prof]

e.g. ``cnn "loop, serial" 2 8 tuned 5`` against ``cnn torchopt 2 8 no 5``.
"""

import statistics
import sys
import time

import torch

from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.measure import peak_rss, reset_peak_rss
from fsl_dist.bench.peers import METHODS
from fsl_dist.cpu_malloc import tune_cpu_malloc
from fsl_dist.models import build_model


def main(argv):
    model_name, method, threads, meta_batch, malloc, steps = argv[:6]
    if malloc == "tuned":
        tune_cpu_malloc()
    torch.manual_seed(0)
    torch.set_num_threads(int(threads))
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": int(meta_batch)}
    model = build_model(model_name, 5, **model_options(case))
    tasks = synthetic_tasks(case, torch.device("cpu"))
    backward = METHODS[method][1](model, tasks, case)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        backward()
        optimizer.step()
    base = reset_peak_rss()
    for _ in range(2):
        step()
    times = []
    for _ in range(int(steps)):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    peak = (peak_rss() - base) / 2**20
    print(f"peak {peak:.0f} MiB {model_name} {method} threads={threads} mb={meta_batch} "
          f"malloc={malloc}: median {statistics.median(times):.3f} s, "
          f"all {[round(t, 3) for t in times]}")
    if "prof" in argv:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main(sys.argv[1:])
