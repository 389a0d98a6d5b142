"""What probe steps of each checkpoint level leave resident, anonymous and file pages apart
(``RssAnon``, ``RssFile``), after a garbage collection and a heap trim (section 23 of the log).

    PYTHONPATH=/work/main OMP_NUM_THREADS=2 python residue_by_kind.py MODEL LEVEL:WORKERS ... \
        [--dynamo]

e.g. ``resnet none:2 none:1 blocks:1 none:1 blocks:1 --dynamo``; ``--dynamo`` imports
``torch._dynamo`` first, as a training process has.
"""

import gc
import importlib
import sys

import torch

from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.peers import case_spec
from fsl_dist.cpu_malloc import release_free_memory, single_arena, tune_cpu_malloc
from fsl_dist.meta import meta_backward
from fsl_dist.models import build_model


def resident_mib():
    fields = {line.split(":")[0]: int(line.split()[1])
              for line in open("/proc/self/status") if line.startswith("Rss")}
    return fields["RssAnon"] / 1024, fields["RssFile"] / 1024


def main(argv):
    if "--dynamo" in argv:
        importlib.import_module("torch._dynamo")
    model_name, *steps = [a for a in argv if a != "--dynamo"]
    single_arena()
    tune_cpu_malloc(False)
    torch.set_num_threads(2)
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": 8}
    model = build_model(model_name, 5, **model_options(case))
    tasks = synthetic_tasks(case, torch.device("cpu"))
    before = resident_mib()
    print("start: anon %.1f, file %.1f MiB" % before)
    for level, workers in (s.split(":") for s in steps):
        for _ in range(2):
            meta_backward(model, tasks, case_spec(case, checkpoint=level), workers=int(workers))
            for p in model.parameters():
                p.grad = None
        gc.collect()
        release_free_memory()
        now = resident_mib()
        print(f"{level} x{workers}: anon {now[0] - before[0]:+.1f}, "
              f"file {now[1] - before[1]:+.1f} MiB")
        before = now


if __name__ == "__main__":
    main(sys.argv[1:])
