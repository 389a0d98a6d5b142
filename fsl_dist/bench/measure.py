"""Measuring one row (a method on a case) in its own process: timed steps, peak memory and the
meta-gradient check; the case's FLOP count, its float64 meta-gradient and the matrix-product
ceiling the FLOP rates are compared with."""

import json
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import fsl_dist
from fsl_dist.cpu_malloc import single_arena, start_environment, tune_cpu_malloc
from fsl_dist.models import build_model
from fsl_dist.numerics import gradient_of

from .cases import model_options, synthetic_tasks
from .peers import METHODS, REFERENCE, Unavailable, tunes_malloc


def meta_gradient(backward, model) -> torch.Tensor:
    """``backward``'s meta-gradient at the model's current weights, flattened in parameter order."""
    return gradient_of(backward, model.parameters())


def float64_gradient(case) -> torch.Tensor:
    """The case's meta-gradient in float64 (plain-autograd reference, CPU): the truth that the
    float32 methods' rounding is measured against."""
    torch.manual_seed(0)
    model = build_model(case["model"], case["n_way"], **model_options(case)).double()
    tasks = {k: v.double() if v.is_floating_point() else v
             for k, v in synthetic_tasks(case, "cpu").items()}
    return meta_gradient(REFERENCE(model, tasks, case), model)


def count_flops(case, device="cpu") -> float:
    """FLOP of one meta-step's meta-gradient over the case's meta-batch, counted on the plain
    autograd reference (``reference_task``: the math and nothing else) for one task under
    FlopCounterMode, times the meta-batch."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = build_model(case["model"], case["n_way"], **model_options(case)).to(device)
    tasks = synthetic_tasks(case, device, meta_batch=1)
    counter = FlopCounterMode(display=False)
    with counter:
        REFERENCE(model, tasks, case)()
    return float(counter.get_total_flops()) * case["meta_batch"]


# --- the ceiling --------------------------------------------------------------------------------

def _product_seconds(a, b, sync) -> float:
    sync()
    start = time.perf_counter()
    torch.mm(a, b)
    sync()
    return time.perf_counter() - start


def _ceiling_size(device, dtype, size, sync, seconds_per_product) -> int:
    """``size``, halved (not below 512) until one product is estimated to take at most
    ``seconds_per_product``: a CPU without bf16 instructions multiplies bf16 at well under
    1 GFLOP/s (0.3 measured on an AVX2-only AMD EPYC), where one 2048^2 product took a minute."""
    probe = 512
    a = torch.ones(probe, probe, device=device, dtype=dtype)
    _product_seconds(a, a, sync)  # warm-up
    probe_s = _product_seconds(a, a, sync)
    while size > probe and probe_s * (size / probe) ** 3 > seconds_per_product:
        size //= 2
    return size


def measure_ceiling(device, threads, size, repeats, seconds_per_product=2.0) -> dict:
    """Median GFLOP/s of ``size x size`` float32 and bfloat16 matrix products (a dtype whose
    product would take longer than ``seconds_per_product`` at ``size`` is measured smaller;
    ``sizes`` records the size of each)."""
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {"size": size, "repeats": repeats, "sizes": {}}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        n = _ceiling_size(device, dtype, size, sync, seconds_per_product)
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        torch.mm(a, b)  # warm-up
        times = [_product_seconds(a, b, sync) for _ in range(repeats)]
        out[name] = 2 * n**3 / statistics.median(times) / 1e9
        out["sizes"][name] = n
    return out


# --- peak memory --------------------------------------------------------------------------------

def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the RSS high-water mark (Linux: clear_refs 5), so that imports and set-up that
    peaked earlier do not hide the row's own peak; returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:  # not Linux: fall back to the max RSS so far (can hide the row's peak)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- one row ------------------------------------------------------------------------------------

def run_row(spec: dict) -> dict:
    """Measure one (case, method) in this process."""
    if spec["device"] == "cpu" and tunes_malloc(spec["method"]):
        tune_cpu_malloc()
        if "budget_mib" in spec:  # as launch/train.py with a budget (trainer.configure_cpu)
            single_arena()
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    case = spec["case"]
    model = build_model(case["model"], case["n_way"], **model_options(case)).to(device)
    tasks = synthetic_tasks(case, device)
    if "budget_mib" in spec:  # "loop, memory plan": the peak a step may add
        case = {**case, "budget_mib": spec["budget_mib"]}
    try:
        backward = METHODS[spec["method"]][1](model, tasks, case)
    except Unavailable as why:
        return {"unavailable": str(why)}
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        backward()
        optimizer.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    if spec.get("grad_out"):  # the first round of a row; later rounds only time it
        save_meta_gradient(backward, model, spec)
    for _ in range(spec["warmup"]):
        step()
    times, cpu_times = [], []
    for _ in range(spec["steps"]):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    median = statistics.median(times)
    row = {"s_per_step": median, "tasks_per_s": case["meta_batch"] / median,
           "peak_mem_mib": peak / 2**20, "steps": spec["steps"], "warmup": spec["warmup"],
           "step_times": times, "cpu_s_per_step": statistics.median(cpu_times)}
    if hasattr(backward, "plan_record"):
        row["memory_plan"] = backward.plan_record
    return row


def save_meta_gradient(backward, model, spec: dict) -> None:
    """The meta-gradient at the initial weights (also the first warm-up step's work) into
    ``spec["grad_out"]``, on one intra-op thread for every method: kernels sum in another order
    on two threads, which in float32 moves a ResNet meta-gradient by ~1e-4 (as far as float32 is
    from float64 here) and would hide whether two methods compute the same math."""
    torch.set_num_threads(1)
    grad = meta_gradient(backward, model)
    torch.set_num_threads(spec["threads"])
    torch.save(grad.float().cpu(), spec["grad_out"])


def measure_row_here(row_json: str) -> None:
    """The --row mode: one row's result as the last line of stdout (see run_in_subprocess)."""
    try:
        print(json.dumps(run_row(json.loads(row_json))))
    except Exception:
        traceback.print_exc()
        sys.exit(1)


def run_in_subprocess(spec: dict, timeout: float) -> dict:
    """The row's result, ``{"unavailable": why}`` or ``{"error": why}``: measured by
    ``python -m fsl_dist.bench --row`` in a fresh process, so that its peak memory is its own."""
    command = [sys.executable, "-m", "fsl_dist.bench", "--row", json.dumps(spec)]
    # Run from the folder that holds this fsl_dist: ``-m`` imports from the working folder
    # first, so the row measures the code of the run that started it (a clone's, say).
    package_root = Path(fsl_dist.__file__).resolve().parents[1]
    # fsl_dist's rows start as a CPU training process does (cli/starting.py), the peers as shipped
    env = (start_environment(allocator=spec.get("cpu_allocator", "glibc"))
           if spec["device"] == "cpu" and tunes_malloc(spec["method"]) else None)
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                             cwd=package_root, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        if out.returncode < 0:
            why = f"killed by signal {-out.returncode}" + (
                " (out of memory?)" if out.returncode == -9 else "")
        else:
            why = lines[-1] if lines else f"exit status {out.returncode}"
        return {"error": why, "stderr": out.stderr[-3000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def pool_rounds(results: list[dict], meta_batch: int) -> dict:
    """One row from a method's rounds: the median over every timed step of every round, the
    highest peak memory, each round's own median (how far the machine drifted), and under a
    budget each round's plan record with its peak (``memory_plan_rounds``)."""
    if len(results) == 1 or "tasks_per_s" not in results[0]:
        return results[0]
    failed = [r for r in results if "tasks_per_s" not in r]
    if failed:
        return failed[0]
    times = [t for r in results for t in r["step_times"]]
    median = statistics.median(times)
    pooled = {"s_per_step": median, "tasks_per_s": meta_batch / median,
              "peak_mem_mib": max(r["peak_mem_mib"] for r in results),
              "steps": len(times), "warmup": results[0]["warmup"], "step_times": times,
              "rounds": len(results),
              "round_tasks_per_s": [r["tasks_per_s"] for r in results]}
    if "memory_plan" in results[0]:  # each round planned for its own budget, in its own heap
        pooled["memory_plan_rounds"] = [{**r["memory_plan"], "peak_mem_mib": r["peak_mem_mib"]}
                                        for r in results]
    return pooled
