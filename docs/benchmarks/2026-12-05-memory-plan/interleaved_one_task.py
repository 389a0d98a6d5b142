"""Section 28 of the log: one task at a time on two threads against the peers, their steps
interleaved in one process, so that the machine's drift falls on every method alike.

Methods, each a meta-gradient of meta-batch MB (no update): fsl_dist one task at a time
("one"; the plan the two-thread budget rows take), fsl_dist two tasks side by side ("two"; the
default without a budget, one intra-op thread per task), and the named bench peers. One arena
and fsl_dist's malloc settings for all (the peers as shipped would run with glibc's defaults;
here they get fsl_dist's allocator too, so only the arithmetic's schedule differs).

    PYTHONPATH=/work/main OMP_NUM_THREADS=2 \
    GLIBC_TUNABLES=glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0 \
        python interleaved_one_task.py MODEL MB ROUNDS learn2learn torchopt
"""

import statistics
import sys
import time

import torch

from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.peers import METHODS, fsl_dist_method
from fsl_dist.cpu_malloc import single_arena, tune_cpu_malloc
from fsl_dist.models import build_model


def main(argv):
    model_name, meta_batch, rounds = argv[0], int(argv[1]), int(argv[2])
    single_arena()
    tune_cpu_malloc()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": meta_batch}
    model = build_model(model_name, 5, **model_options(case))
    tasks = synthetic_tasks(case, torch.device("cpu"))
    methods = {"one": fsl_dist_method(vectorize=False, workers=1)(model, tasks, case),
               "two": fsl_dist_method(vectorize=False, workers=2)(model, tasks, case)}
    methods.update({name: METHODS[name][1](model, tasks, case) for name in argv[3:]})
    times = {name: [] for name in methods}
    for _ in range(rounds + 1):  # the first round warms up
        for name, backward in methods.items():
            started = time.perf_counter()
            backward()
            times[name].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    fastest_peer = min(statistics.median(t[1:]) for n, t in times.items() if n not in
                       ("one", "two"))
    for name, measured in times.items():
        median = statistics.median(measured[1:])
        print(f"{model_name} mb{meta_batch} {name:12s} median {median:.3f} s of {rounds}, "
              f"min {min(measured[1:]):.3f}, x fastest peer {fastest_peer / median:.3f}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
