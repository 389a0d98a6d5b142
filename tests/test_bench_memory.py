"""launch/bench_memory.py's summary of how the peak grows with the inner steps (the rows
themselves take minutes each: docs/benchmarks/2026-12-05-memory-per-task.md)."""

from fsl_dist.bench.memory import growth_lines


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
