"""Does one task at a time cost more per task at meta-batch 32 than at 8 (ResNet, 28x28)?
In one process, alternating: one meta_backward over 32 tasks, and four over 8 of the same tasks;
per-task times inside each call (objective._one_task wrapped) and the time outside the tasks.
    LD_PRELOAD=... PYTHONPATH=/work/main OMP_NUM_THREADS=2 python mb_scaling.py MODEL ROUNDS"""
import statistics
import sys
import time

import torch

from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.peers import case_spec
from fsl_dist.cpu_malloc import loaded_tcmalloc
from fsl_dist.meta import objective
from fsl_dist.models import build_model

model_name, rounds = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
        "inner_steps": 1, "meta_batch": 32}
torch.manual_seed(0)
model = build_model(model_name, 5, **model_options(case))
tasks = synthetic_tasks(case, torch.device("cpu"))
spec = case_spec(case)
task_times = []
inner = objective._one_task


def timed(*args, **kwargs):
    task_times.append(time.perf_counter())  # a task's start: the previous one's end
    return inner(*args, **kwargs)


objective._one_task = timed


def step(parts):
    task_times.clear()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for part in parts:
        objective.meta_backward(model, part, spec, acc_before=False, workers=1)
    end = time.perf_counter()
    starts = task_times + [end]
    per_task = [b - a for a, b in zip(starts, starts[1:])]  # forward, inner step and backward
    return end - start, starts[0] - start, per_task


whole = [tasks]
quarters = [{k: v[i:i + 8] for k, v in tasks.items()} for i in range(0, 32, 8)]
print("allocator:", loaded_tcmalloc() or "glibc")
for _ in range(2):
    step(whole), step(quarters)
rows = {"1 call of 32": [], "4 calls of 8": []}
for _ in range(rounds):
    for name, parts in (("1 call of 32", whole), ("4 calls of 8", quarters)):
        rows[name].append(step(parts))
for name, results in rows.items():
    totals = [r[0] for r in results]
    before = [r[1] for r in results]
    firsts = [statistics.mean(r[2][:8]) for r in results]
    lasts = [statistics.mean(r[2][-8:]) for r in results]
    print(f"{name}: step {statistics.median(totals):.3f} s, before the first task "
          f"{statistics.median(before) * 1e3:.1f} ms; a task of the first 8 "
          f"{statistics.median(firsts) * 1e3:.1f} ms, of the last 8 "
          f"{statistics.median(lasts) * 1e3:.1f} ms")
