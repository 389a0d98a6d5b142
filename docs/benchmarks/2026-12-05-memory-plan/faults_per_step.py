"""Section 28 of the log: minor page faults and time per step of one method (one task at a time,
"one", or a bench peer), two threads, Adam after each meta-gradient; glibc, or whatever
LD_PRELOAD gives. E.g. ``LD_PRELOAD=.../libtcmalloc_minimal.so.4 TCMALLOC_RELEASE_RATE=0
PYTHONPATH=/work/main python faults_per_step.py resnet 8 one``.
"""

import resource
import statistics
import sys
import time

import torch

from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.peers import METHODS, fsl_dist_method
from fsl_dist.models import build_model


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(model_name: str, meta_batch: int, method: str) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": meta_batch}
    model = build_model(model_name, 5, **model_options(case))
    tasks = synthetic_tasks(case, torch.device("cpu"))
    make = fsl_dist_method(vectorize=False, workers=1) if method == "one" else METHODS[method][1]
    backward = make(model, tasks, case)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    times, faults = [], []
    for _ in range(5):  # the first warms up
        optimizer.zero_grad(set_to_none=True)
        before, started = minor_faults(), time.perf_counter()
        backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
        faults.append(minor_faults() - before)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    hwm_mib = int(status["VmHWM"].split()[0]) // 1024
    print(f"{model_name} mb{meta_batch} {method}: median {statistics.median(times[1:]):.3f} s, "
          f"faults/step {faults[1:]}, VmHWM {hwm_mib} MiB")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
