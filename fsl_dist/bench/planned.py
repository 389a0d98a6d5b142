"""The bench method "loop, memory plan": fsl_dist under ``train.memory_budget_gb``.

The row's budget is given as the peak memory a step may add (``budget_mib``, what the table's
peak column measures: RSS above the process's RSS before the first step), usually the lightest
peer's measured peak. The planner (``fsl_dist.memory_plan``) works on absolute peaks, so it
gets the process's resident set before planning plus that allowance. It plans as the trainer
does (probe steps of the row's model and tasks, the trainer's config for the case), frees what
the probes left in the heap, and the row then times the chosen plan like any other method.
"""

import gc

from fsl_dist.config import load_config
from fsl_dist.cpu_malloc import release_free_memory
from fsl_dist.memory_plan import GB, apply_to_spec, held_bytes, plan_arguments, plan_memory
from fsl_dist.meta import meta_backward
from fsl_dist.meta.precision import InnerLossScaler

from .peers import INNER_LR, case_spec


def case_config(case: dict, budget_gb: float):
    """The trainer's config for the case (its shipped config, the case's task and inner loop)."""
    overrides = [f"algorithm.name={case['algorithm']}", f"task.n_way={case['n_way']}",
                 f"task.k_shot={case['k_shot']}",
                 f"task.q_query={case['n_query']}", f"train.meta_batch_size={case['meta_batch']}",
                 f"algorithm.inner_steps={case['inner_steps']}",
                 f"algorithm.inner_lr={INNER_LR}", f"train.memory_budget_gb={budget_gb}"]
    return load_config(f"{case['model']}_maml", overrides)


def bench_state(cfg, model):
    """The trainer's state around the row's ``model``: its family's learner, Adam, scalers."""
    import torch

    from fsl_dist.learners import learner_from_config
    from fsl_dist.trainer import TrainState

    return TrainState(model, learner_from_config(cfg, model),
                      torch.optim.Adam(model.parameters(), 1e-3), InnerLossScaler(),
                      InnerLossScaler())


def planned_method(model, tasks, case):
    """Plan for ``case["budget_mib"]`` more than the RSS now, then run the chosen plan."""
    from fsl_dist.distributed import Distributed

    dist = Distributed()
    cfg = case_config(case, 1.0)  # the budget is set below, once the RSS before is known
    state = bench_state(cfg, model)
    gc.collect()
    release_free_memory()
    device = next(model.parameters()).device
    # What the process holds once everything is imported and built: the allowance goes on top.
    before = held_bytes(device)
    budget_gb = (before + case["budget_mib"] * 2**20) / GB
    plan, record = plan_memory(state, tasks, case_config(case, budget_gb), "no", dist)
    gc.collect()
    release_free_memory()  # the row's own peak is measured from here
    after = held_bytes(device)
    spec = apply_to_spec(case_spec(case), plan)
    arguments = plan_arguments(plan)

    def backward():
        meta_backward(model, tasks, spec, acc_before=False, **arguments)
    # The row's peak column is above its start, which is after planning: what planning left
    # in the process (drift) is added to it for the comparison with the budget.
    backward.plan_record = {**record, "budget_mib_above_rss": case["budget_mib"],
                            "planning_left_mib": (after - before) / 2**20}
    return backward
