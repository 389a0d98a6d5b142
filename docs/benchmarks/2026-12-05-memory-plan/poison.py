"""Does a tuned probe raise later probes' peaks? (log, section 11)

    PYTHONPATH=/work/main OMP_NUM_THREADS=1 python poison.py cnn 2   # model, intra-op threads

Conv-4 (or ResNet, checkpoint blocks) MAML 5w1s15q, meta-batch 32: the memory plan's probes, in
one process with one malloc arena as ``plan_memory`` sets, in a fixed order.
"""

import gc
import sys

import torch

from fsl_dist.bench.cases import synthetic_tasks
from fsl_dist.bench.planned import bench_state, case_config
from fsl_dist.cpu_malloc import release_free_memory, single_arena
from fsl_dist.distributed import Distributed
from fsl_dist.memory_plan import Plan, Prober, status_bytes
from fsl_dist.models import build_model

MIB = 2**20


def main():
    model_name = sys.argv[1] if len(sys.argv) > 1 else "cnn"
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    torch.manual_seed(0)
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": 32}
    model = build_model(model_name, 5)
    tasks = synthetic_tasks(case, "cpu")
    cfg = case_config(case, 10.0)
    state = bench_state(cfg, model)
    single_arena()
    gc.collect()
    release_free_memory()
    print("rss before", status_bytes("VmRSS") / MIB, flush=True)
    prober = Prober(state, tasks, cfg, "no", Distributed())
    level = "blocks" if model_name == "resnet" else "none"
    order = [(2, "defaults"), (1, "defaults"), (1, "tuned"), (1, "defaults"), (2, "tuned"),
             (2, "defaults"), (1, "tuned")]
    for in_flight, malloc in order:
        plan = Plan(False, in_flight, level, malloc)
        probe = prober([plan])[0]
        print(f"{plan.name}: growth {(probe.peak - probe.before) / MIB:.1f} MiB above before "
              f"{probe.before / MIB:.1f}, {probe.seconds:.2f} s", flush=True)


if __name__ == "__main__":
    main()
