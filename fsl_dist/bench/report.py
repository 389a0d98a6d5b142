"""The benchmark's tables: one row per (case, method), one line per case against the best
peer, the figures filled in once a case's rows are measured, and which saved rows a resumed
run keeps."""

import sys
from pathlib import Path

from fsl_dist.numerics import agreement

from .cases import model_label, task_name
from .peers import METHODS, PEERS

HEADER = ["model", "algorithm", "task", "inner steps", "meta-batch", "method", "tasks/s",
          "s/step", "peak mem (MiB)", "GFLOP/step", "GFLOP/s", "% fp32 ceiling",
          "x best peer", "max rel. diff vs loop", "max rel. diff vs float64", "cosine vs float64"]
MODEL_NAMES = {"cnn": "Conv-4", "resnet": "ResNet", "resnet12": "ResNet-12"}


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(rows) -> str:
    lines = ["| " + " | ".join(HEADER) + " |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = (f"| {model_label(r)} | {r['algorithm']} | {task_name(r)} | {r['inner_steps']} "
                f"| {r['meta_batch']} | {r['method']} ")
        if "tasks_per_s" not in r:
            why = r.get("unavailable") or f"failed: {r.get('error')}"
            lines.append(head + f"| {why.replace('|', '/')} | | | | | | | | | |")
            continue
        lines.append(
            head + f"| {r['tasks_per_s']:.2f} | {r['s_per_step']:.3f} | {r['peak_mem_mib']:.0f} "
            f"| {_fmt(r.get('gflop_per_step'), '.1f')} | {_fmt(r.get('gflop_per_s'), '.1f')} "
            f"| {_fmt(r.get('pct_fp32_ceiling'), '.1f')} | {_fmt(r.get('x_best_peer'), '.2f')} "
            f"| {_fmt(r.get('max_rel_diff'), '.1e')} "
            f"| {_fmt(r.get('max_rel_diff_float64'), '.1e')} "
            f"| {_fmt(r.get('cosine_float64'), '.5f')} |")
    return "\n".join(lines)


def finish_case(case_rows, grads, flops, ceiling, truth=None):
    """Fill in agreement, FLOP rate and ratio to the best peer for one case's rows."""
    reference = grads.get("loop")
    peer_rates = [r["tasks_per_s"] for r in case_rows
                  if r["method"] in PEERS and "tasks_per_s" in r]
    best_peer = max(peer_rates) if peer_rates else None
    for r in case_rows:
        if "tasks_per_s" not in r:
            continue
        if reference is not None and r["method"] in grads:
            r.update(agreement(grads[r["method"]], reference))
        if truth is not None and r["method"] in grads:
            versus_truth = agreement(grads[r["method"]], truth)
            r["max_rel_diff_float64"] = versus_truth["max_rel_diff"]
            r["cosine_float64"] = versus_truth["cosine"]
        r["gflop_per_step"] = flops / 1e9
        r["gflop_per_s"] = flops / r["s_per_step"] / 1e9
        r["pct_fp32_ceiling"] = 100 * r["gflop_per_s"] / ceiling["float32"]
        r["x_best_peer"] = r["tasks_per_s"] / best_peer if best_peer else None
    round_peers = [r["round_tasks_per_s"] for r in case_rows
                   if r["method"] in PEERS and "round_tasks_per_s" in r]
    for r in case_rows:  # the ratio within each round, where the methods ran side by side
        if round_peers and "round_tasks_per_s" in r:
            r["x_best_peer_rounds"] = [rate / max(peers) for rate, peers in
                                       zip(r["round_tasks_per_s"], zip(*round_peers))]


def round_range(ratios) -> str:
    return " / ".join(f"{x:.2f}" for x in ratios) if ratios else "-"


def case_summary(rows) -> str:
    """One line per case with the figures the goals name: fsl_dist's default path (loop)
    against the best peer, the bf16 meta-gradient's cosine to float64 and, for ANIL, the
    features-once gain over recomputing them (loop over 'loop, no feature reuse')."""
    with_rounds = any("x_best_peer_rounds" in r for r in rows)  # a --rounds run
    titles = ["case", "loop tasks/s", "best peer tasks/s", "x best peer"]
    titles += ["x best peer, each round"] * with_rounds
    titles += ["bf16 cosine vs float64", "features-once over no reuse"]
    lines = ["| " + " | ".join(titles) + " |", "|---" + "|---:" * (len(titles) - 1) + "|"]
    by_case = {}
    for r in rows:
        model = MODEL_NAMES.get(r["model"], r["model"]) + model_label(r)[len(r["model"]):]
        key = (model, r["algorithm"], task_name(r), r["inner_steps"], r["meta_batch"])
        by_case.setdefault(key, {})[r["method"]] = r
    for key, methods in by_case.items():
        lines.append("| " + " | ".join(_summary_cells(key, methods, with_rounds)) + " |")
    return "\n".join(lines)


def _summary_cells(key, methods: dict, with_rounds: bool) -> list[str]:
    model, algorithm, task, steps, meta_batch = key
    rate = {m: r["tasks_per_s"] for m, r in methods.items() if "tasks_per_s" in r}
    loop = rate.get("loop")
    peer = max((m for m in PEERS if m in rate), key=rate.get, default=None)
    no_reuse = rate.get("loop, no feature reuse")
    return [f"{model} {algorithm.upper()}, {task}, {steps} "
            f"step{'s' if steps > 1 else ''}, meta-batch {meta_batch}",
            _fmt(loop, ".2f"),
            f"{rate[peer]:.2f} ({peer})" if peer else "-",
            f"{loop / rate[peer]:.2f}x" if loop and peer else "-",
            *[round_range(methods.get("loop", {}).get("x_best_peer_rounds"))] * with_rounds,
            _fmt(methods.get("default, bf16", {}).get("cosine_float64"), ".5f"),
            f"{loop / no_reuse:.2f}x" if loop and no_reuse else "-"]


def plan_lines(rows) -> str:
    """One line per row measured under a budget ("loop, memory plan"), and per round where it
    ran in rounds: the plan chosen, and the row's peak with what planning left in the process
    (the peak column counts from after planning) against the budget, both above the RSS before
    planning."""
    lines = []
    for r in rows:
        if "peak_mem_mib" not in r:
            continue
        records = r.get("memory_plan_rounds") or (
            [{**r["memory_plan"], "peak_mem_mib": r["peak_mem_mib"]}] if "memory_plan" in r
            else [])
        for index, record in enumerate(records):
            budget, left = record["budget_mib_above_rss"], record["planning_left_mib"]
            total = record["peak_mem_mib"] + left
            where = f", round {index + 1}" if len(records) > 1 else ""
            lines.append(
                f"- {model_label(r)} {r['algorithm']}, {task_name(r)}, meta-batch "
                f"{r['meta_batch']}{where}: {record['name']}; {record['peak_mem_mib']:.1f} + "
                f"{left:.1f} MiB left by planning = {total:.1f} MiB, "
                f"{'within' if total <= budget else 'OVER'} the budget of {budget:.1f} MiB")
    return "\n".join(lines)


def ceiling_line(ceiling: dict) -> str:
    """``float32 X GFLOP/s, bfloat16 Y GFLOP/s (NxN matrix product, median of R)``, naming a
    dtype's own size where it was measured smaller (runs saved before ``sizes`` have one)."""
    sizes = ceiling.get("sizes", {})
    parts = []
    for name in ("float32", "bfloat16"):
        n = sizes.get(name, ceiling["size"])
        own = f" ({n}x{n})" if n != ceiling["size"] else ""
        parts.append(f"{name} {ceiling[name]:.1f} GFLOP/s{own}")
    return (f"{', '.join(parts)} ({ceiling['size']}x{ceiling['size']} matrix product, median "
            f"of {ceiling['repeats']})")


def rounds_note(rounds: int, warmup: int) -> str:
    if rounds == 1:
        return ""
    return (f", in {rounds} rounds of a fresh process per method, the methods interleaved "
            f"(each round {warmup} warm-up step(s) of its own)")


def report(header, rows) -> str:
    ceiling = header["ceiling_gflop_per_s"]
    return (f"Machine: {header['machine']}.\n"
            f"Peers: {', '.join(f'{k} {v}' for k, v in header['peers'].items())}.\n"
            f"Ceiling: {ceiling_line(ceiling)}.\n"
            f"Timed: median of {header['steps']} steps after the meta-gradient check and "
            f"{header['warmup']} warm-up step(s)"
            f"{rounds_note(header.get('rounds', 1), header['warmup'])}.\n\n{markdown(rows)}\n\n"
            f"Per case, the default path against the best peer:\n\n{case_summary(rows)}"
            + (f"\n\nUnder a memory budget (peaks above the RSS before planning):\n{plans}"
               if (plans := plan_lines(rows)) else ""))


# --- resuming a saved run -----------------------------------------------------------------------

def is_row_of(row, case) -> bool:
    return all(row.get(k) == v for k, v in case.items())


def already_measured(case, earlier_rows, methods) -> list[dict]:
    """The resumed run's rows of this case, if they hold every method that applies to it."""
    kept = [r for r in earlier_rows if is_row_of(r, case)]
    wanted = {m for m in methods if METHODS[m][0](case)}
    return kept if kept and {r["method"] for r in kept} >= wanted else []


def rows_of_other_cases(earlier_rows, selected) -> list[dict]:
    """The resumed run's rows of cases outside this selection: kept in the file, so that
    resuming with a narrower (or another) selection loses nothing already measured."""
    return [r for r in earlier_rows if not any(is_row_of(r, case) for case in selected)]


def check_same_machine(saved: dict, json_path: Path, current: str) -> None:
    """A resumed run must continue on the machine it started on: one table, one machine."""
    if saved.get("machine") != current:
        sys.exit(f"{json_path}: this run was measured on\n  {saved.get('machine')}\nbut this "
                 f"machine is\n  {current}\nResuming would put rows of two machines in one "
                 f"table under the first one's ceiling; start a new run with another --json.")
