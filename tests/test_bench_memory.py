"""launch/bench_memory.py's summary of how the peak grows with the inner steps (the rows
themselves take minutes each: docs/benchmarks/2026-12-05-memory-per-task.md), and
launch/bench.py's lines for rows under a memory budget."""

from fsl_dist.bench.measure import pool_rounds
from fsl_dist.bench.memory import growth_lines
from fsl_dist.bench.report import plan_lines


def row(level, steps, above):
    return {"level": level, "steps": steps, "above_start_mib": above}


def test_growth_per_further_step_is_a_share_of_the_one_step_peak():
    rows = [row("blocks", 1, 2000.0), row("blocks", 5, 2400.0), row("blocks", 10, 2900.0),
            row("none", 5, 9000.0), {"level": "steps", "steps": 1, "failed": "killed"},
            row("steps", 5, 4000.0)]
    # none and steps lack a 1-step row: nothing to compare with
    assert growth_lines(rows) == [
        "blocks: 1 to 5 steps, +100 MiB per further step, 5.0% of the 1-step peak",
        "blocks: 1 to 10 steps, +100 MiB per further step, 5.0% of the 1-step peak"]


def test_a_peer_row_computes_the_same_meta_gradient_as_the_none_row():
    import torch

    from fsl_dist.bench.cases import synthetic_tasks
    from fsl_dist.bench.memory import PEERS, row_method
    from fsl_dist.bench.peers import Unavailable
    from fsl_dist.models import build_model

    case = {"model": "cnn", "algorithm": "maml", "n_way": 3, "k_shot": 1, "n_query": 2,
            "meta_batch": 1}
    torch.manual_seed(0)
    model = build_model("cnn", 3, width=4)
    tasks = synthetic_tasks(case, torch.device("cpu"))

    def gradient(level):
        for p in model.parameters():
            p.grad = None
        row_method(level, 2, model, tasks, case)()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    reference = gradient("none")
    for peer in PEERS:
        try:
            grad = gradient(peer)
        except Unavailable:  # not installed here: launch/install_bench_peers.sh
            continue
        assert ((grad - reference).norm() / reference.norm()).item() < 1e-5, peer


def test_rows_under_a_budget_get_a_line_with_what_planning_left_added_to_their_peak():
    case = {"model": "cnn", "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1}
    record = {"name": "loop, 1 task at a time, checkpoint none, cpu malloc tuned",
              "budget_mib_above_rss": 200.0}
    rows = [{**case, "meta_batch": 8, "method": "torchopt", "peak_mem_mib": 200.0},
            {**case, "meta_batch": 8, "method": "loop, memory plan", "peak_mem_mib": 150.0,
             "memory_plan": {**record, "planning_left_mib": 50.0}},
            {**case, "meta_batch": 32, "method": "loop, memory plan", "peak_mem_mib": 150.0,
             "memory_plan": {**record, "planning_left_mib": 50.5}},
            {**case, "meta_batch": 64, "method": "loop, memory plan", "error": "timed out",
             "memory_plan": {**record, "planning_left_mib": 0.0}}]
    assert plan_lines(rows).splitlines() == [
        f"- cnn maml, 5w1s15q, meta-batch 8: {record['name']}; 150.0 + 50.0 MiB left by "
        "planning = 200.0 MiB, within the budget of 200.0 MiB",
        f"- cnn maml, 5w1s15q, meta-batch 32: {record['name']}; 150.0 + 50.5 MiB left by "
        "planning = 200.5 MiB, OVER the budget of 200.0 MiB"]
    assert plan_lines(rows[:1]) == ""
    # pooled rounds: each round planned for its own budget, a line each
    rounds = [{**record, "planning_left_mib": 40.0, "peak_mem_mib": 150.0},
              {**record, "budget_mib_above_rss": 180.0, "planning_left_mib": 40.0,
               "peak_mem_mib": 145.0}]
    pooled = pool_rounds([{"tasks_per_s": 8.0, "peak_mem_mib": r["peak_mem_mib"],
                           "step_times": [1.0], "warmup": 1, "memory_plan": {
                               k: v for k, v in r.items() if k != "peak_mem_mib"}}
                          for r in rounds], 8)
    assert pooled["peak_mem_mib"] == 150.0 and pooled["memory_plan_rounds"] == rounds
    assert plan_lines([{**case, "meta_batch": 8, "method": "loop, memory plan",
                        **pooled}]).splitlines() == [
        f"- cnn maml, 5w1s15q, meta-batch 8, round 1: {record['name']}; 150.0 + 40.0 MiB left "
        "by planning = 190.0 MiB, within the budget of 200.0 MiB",
        f"- cnn maml, 5w1s15q, meta-batch 8, round 2: {record['name']}; 145.0 + 40.0 MiB left "
        "by planning = 185.0 MiB, OVER the budget of 180.0 MiB"]
