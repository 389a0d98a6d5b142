"""One bench method's steps (with Adam's update) in this process, one arena as a budget sets,
and optionally a heap trim before every step or the model in channels-last: median seconds
and peak RSS above the start (section 23 of the log).

    PYTHONPATH=/work/main OMP_NUM_THREADS=2 python trim_or_channels_last.py MODEL METHOD \
        THREADS META_BATCH tuned|no STEPS no|trim|cl

e.g. ``cnn "loop, serial" 2 32 tuned 4 trim`` against ``... no`` and ``cnn torchopt 2 32 no
4 no``.
"""

import statistics
import sys
import time

import torch

from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.measure import peak_rss, reset_peak_rss
from fsl_dist.bench.peers import METHODS
from fsl_dist.cpu_malloc import release_free_memory, single_arena, tune_cpu_malloc
from fsl_dist.models import build_model


def main(argv):
    model_name, method, threads, meta_batch, malloc, steps, variant = argv[:7]
    single_arena()
    if malloc == "tuned":
        tune_cpu_malloc()
    torch.manual_seed(0)
    torch.set_num_threads(int(threads))
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": int(meta_batch)}
    model = build_model(model_name, 5, **model_options(case))
    if variant == "cl":
        model = model.to(memory_format=torch.channels_last)
    tasks = synthetic_tasks(case, torch.device("cpu"))
    backward = METHODS[method][1](model, tasks, case)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        if variant == "trim":
            release_free_memory()
        optimizer.zero_grad(set_to_none=True)
        backward()
        optimizer.step()
    base = reset_peak_rss()
    step()
    times = []
    for _ in range(int(steps)):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    peak = (peak_rss() - base) / 2**20
    print(f"peak {peak:.0f} MiB {model_name} {method} mb={meta_batch} malloc={malloc} "
          f"{variant}: median {statistics.median(times):.3f} s, "
          f"all {[round(t, 3) for t in times]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
