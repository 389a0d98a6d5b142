"""The peak of each training step after planning, then of the chosen plan probed again three
times, then of two more steps, in one process (log section 20):

    OMP_NUM_THREADS=2 PYTHONPATH=/work/main python per_step_peaks.py MODEL META_BATCH BUDGET_MIB

BUDGET_MIB: the peak a step may add above the RSS before planning, as the bench row's budget.
Peaks are absolute (VmHWM, reset before each step), GB. With a fourth argument, REPEATS such as
``2,4,6`` (section 23): the chosen plan probed twice with each number of repeat steps, then
eight training steps.
"""

import sys

import torch

from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.measure import peak_rss, reset_peak_rss
from fsl_dist.bench.peers import METHODS
from fsl_dist.bench.planned import bench_state, case_config
from fsl_dist.cpu_malloc import single_arena, tune_cpu_malloc
from fsl_dist.distributed import Distributed
from fsl_dist.memory_plan import GB, Plan, Prober
from fsl_dist.models import build_model


def main(model_name: str, meta_batch: int, budget_mib: float,
         repeats: list[int]) -> None:
    tune_cpu_malloc()
    single_arena()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": meta_batch, "budget_mib": budget_mib}
    model = build_model(model_name, 5, **model_options(case))
    tasks = synthetic_tasks(case, torch.device("cpu"))
    backward = METHODS["loop, memory plan"][1](model, tasks, case)
    record = backward.plan_record
    print("plan", record["name"], "budget", record["budget_gb"], "probe", record["peak_gb"])
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def step() -> float:
        reset_peak_rss()
        optimizer.zero_grad(set_to_none=True)
        backward()
        optimizer.step()
        return round(peak_rss() / 1e9, 4)
    plan = Plan(**record["plan"])
    cfg = case_config(case, record["budget_gb"])
    if repeats:
        for n in repeats:
            prober = Prober(bench_state(cfg, model), tasks, cfg, "no", Distributed(), repeats=n)
            print(f"probed, {n} repeats", [round(prober([plan])[0].peak / GB, 4)
                                           for _ in range(2)])
        print("training steps", [step() for _ in range(8)])
        return
    print("training steps", [step() for _ in range(6)])
    prober = Prober(bench_state(cfg, model), tasks, cfg, "no", Distributed())
    print("probed again", [round(prober([plan])[0].peak / GB, 4) for _ in range(3)])
    print("training steps after", [step() for _ in range(2)])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]),
         [int(n) for n in sys.argv[4].split(",")] if len(sys.argv) > 4 else [])
