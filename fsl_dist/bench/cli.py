"""launch/bench.py's command line: the argument parser, the loop over cases (every row in its
own process) and the JSON file a run writes after every case."""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

import fsl_dist.bench
from fsl_dist.cpu_malloc import TCMALLOC_FILES, chosen_allocator, tcmalloc_dirs, tcmalloc_path
from fsl_dist.io import atomic_write_text

from .cases import cases, parse_task
from .machine import machine_line
from .measure import (
    count_flops,
    float64_gradient,
    measure_ceiling,
    measure_row_here,
    pool_rounds,
    run_in_subprocess,
)
from .peers import DEFAULT_METHODS, LEVERS, METHODS, PEERS, peer_versions
from .report import (
    already_measured,
    ceiling_line,
    check_same_machine,
    finish_case,
    markdown,
    report,
    rows_of_other_cases,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=fsl_dist.bench.__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true",
                        help="5-way 1-shot 15-query, 1 inner step, meta-batch 8, 3 timed steps "
                             "after 1 warm-up, a smaller ceiling product")
    parser.add_argument("--steps", type=int, help="timed steps per row (10; --quick: 3)")
    parser.add_argument("--warmup", type=int,
                        help="warm-up steps per row after the meta-gradient check (2; --quick: 1)")
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS),
                        help="which methods (default: all but the lever rows "
                             + ", ".join(repr(m) for m in LEVERS) + ")")
    parser.add_argument("--models", nargs="*", default=["cnn", "resnet"],
                        help="a subset of the rows")
    parser.add_argument("--image-size", type=int, default=28,
                        help="side of the synthetic square images (84: mini-ImageNet scale)")
    parser.add_argument("--channels", type=int, default=1, help="image channels (3: RGB)")
    parser.add_argument("--width", type=int,
                        help="the model's width (cnn: every block, e.g. 32 for Conv-4-32; "
                             "resnet12: the first block, 64 for 64-160-320-640; default: the "
                             "model's own)")
    parser.add_argument("--algorithms", nargs="*", default=["maml", "boil", "anil"],
                        help="a subset of the rows")
    parser.add_argument("--tasks", nargs="*", type=parse_task,
                        help="a subset of the rows, e.g. 5w1s15q (default 5w1s15q 20w1s5q; "
                             "--quick: 5w1s15q)")
    parser.add_argument("--inner-steps", nargs="*", type=int,
                        help="a subset of the rows (default 1 5; --quick: 1)")
    parser.add_argument("--meta-batches", nargs="*", type=int,
                        help="a subset of the rows (default 8 32; --quick: 8)")
    parser.add_argument("--no-float64-check", dest="float64_check", action="store_false",
                        help="skip the float64 meta-gradient per case (the last column)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="split each row's timed steps over this many rounds, the methods "
                             "interleaved (a fresh process per method and round), so that a slow "
                             "spell of a shared machine falls on every method, not on one")
    parser.add_argument("--plan-budget-mib", type=float,
                        help="the 'loop, memory plan' row's budget: the peak memory a step may "
                             "add (MiB); default: the lightest peer's peak measured before it "
                             "in the same case (list the peers first in --methods)")
    parser.add_argument("--cpu-allocator", default="auto", choices=["auto", "glibc", "tcmalloc"],
                        help="the malloc fsl_dist's rows start with, as train.cpu_allocator "
                             "(auto: tcmalloc for the memory-plan rows where it is found, glibc "
                             "for the rest; the peers start as shipped)")
    parser.add_argument("--row-timeout", type=float, default=3600, help="seconds per row")
    parser.add_argument("--json", type=Path,
                        help="also write the rows here (after every case, complete at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run whose rows are in --json: cases already measured "
                             "there (every method asked for) are kept, with its ceiling, and the "
                             "rows of cases outside this selection stay in the file; only where "
                             "the saved machine line matches (CPU model and ISA flags, CPU "
                             "count, torch, Python, threads)")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: print the tables of the run saved in --json "
                             "(finished or not)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row
    args = parser.parse_args(argv)
    if args.resume and not args.json:
        parser.error("--resume needs --json (the file of the run to continue)")
    if args.cpu_allocator == "tcmalloc" and tcmalloc_path() is None:
        parser.error(f"--cpu-allocator tcmalloc: none of {', '.join(TCMALLOC_FILES)} in "
                     f"{', '.join(tcmalloc_dirs())}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    if args.report and not (args.json and args.json.exists()):
        parser.error(f"--report needs --json naming a file a run wrote (got {args.json})")
    default_steps, default_warmup = (3, 1) if args.quick else (10, 2)
    args.steps = default_steps if args.steps is None else args.steps
    args.warmup = default_warmup if args.warmup is None else args.warmup
    return args


class CaseRunner:
    """Measures every method of one case, each in its own process, and remembers across cases
    which peers cannot be imported and which fsl_dist rows failed."""

    def __init__(self, args, ceiling, tmp):
        self.args, self.ceiling, self.tmp = args, ceiling, tmp
        self.unavailable: dict[str, str] = {}
        self.failed: list[str] = []

    def __call__(self, index: int, case: dict) -> list[dict]:
        flops = count_flops(case)
        truth = float64_gradient(case) if self.args.float64_check else None
        methods = [m for m in self.args.methods if METHODS[m][0](case)]
        results = {m: [] for m in methods}
        self.results = results  # the peers' peaks, for the memory plan's budget
        grads = {}
        rounds = self.args.rounds
        for round_index in range(rounds):
            # rotated each round, so no method always runs first (or right after a heavy one)
            shift = round_index % len(methods)
            for method in methods[shift:] + methods[:shift]:
                if results[method] and "tasks_per_s" not in results[method][0]:
                    continue  # unavailable or failed in an earlier round
                grad_out = (os.path.join(self.tmp, f"{index}-{methods.index(method)}.pt")
                            if round_index == 0 else None)
                steps = -(-self.args.steps // rounds)  # the timed steps split over the rounds
                results[method].append(self.measure(case, method, grad_out, steps))
                if grad_out and "tasks_per_s" in results[method][0]:
                    grads[method] = torch.load(grad_out)
        case_rows = [{**case, "method": m, **pool_rounds(results[m], case["meta_batch"])}
                     for m in methods]
        finish_case(case_rows, grads, flops, self.ceiling, truth)
        for row in case_rows:
            print(markdown([row]).splitlines()[-1], file=sys.stderr, flush=True)
            row.pop("stderr", None)
        return case_rows

    def lightest_peer(self):
        """The lowest peak (MiB) of the peers measured so far in this case, or None."""
        peaks = [r["peak_mem_mib"] for m in PEERS for r in self.results.get(m, [])
                 if "peak_mem_mib" in r]
        return min(peaks) if peaks else None

    def measure(self, case, method, grad_out, steps) -> dict:
        if method in self.unavailable:
            return {"unavailable": self.unavailable[method]}
        args = self.args
        spec = {"case": case, "method": method, "device": args.device, "threads": args.threads,
                "steps": steps, "warmup": args.warmup, "grad_out": grad_out}
        if method == "loop, memory plan":
            budget = args.plan_budget_mib or self.lightest_peer()
            if budget is None:
                return {"unavailable": "no peer's peak measured before it in this case: list "
                                       "the peers first, or give --plan-budget-mib"}
            spec["budget_mib"] = budget
        spec["cpu_allocator"] = chosen_allocator(args.cpu_allocator, "budget_mib" in spec)
        result = run_in_subprocess(spec, timeout=args.row_timeout)
        if "unavailable" in result:
            self.unavailable[method] = result["unavailable"]
        elif "error" in result:  # reported in the table; the run goes on
            print(f"row {spec} failed:\n{result.get('stderr')}", file=sys.stderr)
            if method not in PEERS:
                self.failed.append(f"{method} on {case}: {result['error']}")
        return result


def run_header(args, earlier) -> dict:
    """The run's machine, peers, ceiling and timing: a resumed run keeps its saved ceiling (one
    machine and one ceiling for every row), a new one measures it."""
    device = torch.device(args.device)
    machine = machine_line(device, args.threads, args.cpu_allocator)
    if earlier:
        check_same_machine(earlier, args.json, machine)
        ceiling = earlier["ceiling_gflop_per_s"]
    else:
        size, repeats, seconds = (2048, 3, 0.5) if args.quick else (4096, 5, 2.0)
        ceiling = measure_ceiling(device, args.threads, size, repeats, seconds)
    return {"machine": machine, "peers": peer_versions(),
            "ceiling_gflop_per_s": ceiling, "steps": args.steps, "warmup": args.warmup,
            "rounds": args.rounds}


def save(args, header, rows, complete: bool) -> None:
    # atomic: a killed run leaves the file of its last finished case
    atomic_write_text(args.json, json.dumps(header | {"rows": rows, "complete": complete},
                                            indent=1))


def main(argv=None):
    args = parse_args(argv)
    if args.row:
        return measure_row_here(args.row)
    if args.report:
        saved = json.loads(args.json.read_text())
        print(report(saved, saved["rows"]))
        return
    earlier = json.loads(args.json.read_text()) if args.resume and args.json.exists() else None
    header = run_header(args, earlier)
    print(f"ceiling: {ceiling_line(header['ceiling_gflop_per_s'])}", file=sys.stderr, flush=True)
    selected = cases(args.quick, args.models, args.algorithms, args.inner_steps,
                     args.meta_batches, args.tasks, args.image_size, args.channels, args.width)
    rows = rows_of_other_cases(earlier["rows"], selected) if earlier else []
    with tempfile.TemporaryDirectory() as tmp:
        measure_case = CaseRunner(args, header["ceiling_gflop_per_s"], tmp)
        for index, case in enumerate(selected):
            # kept from the run this one resumes, or measured now
            rows += (already_measured(case, earlier["rows"] if earlier else [], args.methods)
                     or measure_case(index, case))
            if args.json:  # after every case, so an interrupted run can be resumed
                save(args, header, rows, complete=False)
    print(report(header, rows))
    if args.json:
        save(args, header, rows, complete=True)
    if measure_case.failed:  # an fsl_dist path failed: the table is written, the run is an error
        sys.exit("fsl_dist rows failed:\n" + "\n".join(measure_case.failed))
