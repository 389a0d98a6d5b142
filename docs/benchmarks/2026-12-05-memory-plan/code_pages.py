"""What planning leaves as library file pages, and the bench row's comparable peak without them
(log section 24). One process, two threads, one arena, the bench's case, the "loop, memory
plan" row's steps written out.

    python code_pages.py MODEL META_BATCH BUDGET_MIB MODE STEPS

MODE: none (what the library does), or text / clean: also drop by hand the pages of read-only
file mappings (text: code; clean: code and constants) made resident during planning. Written
before the library handed them back itself (f9b3520); after it, "none" already does.
"""
import ctypes
import gc
import json
import mmap
import struct
import sys

import torch

from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.measure import peak_rss, reset_peak_rss
from fsl_dist.bench.peers import case_spec
from fsl_dist.bench.planned import bench_state, case_config
from fsl_dist.cpu_malloc import release_free_memory, single_arena, tune_cpu_malloc
from fsl_dist.distributed import Distributed
from fsl_dist.memory_plan import GB, apply_to_spec, held_bytes, plan_arguments, plan_memory
from fsl_dist.meta import meta_backward
from fsl_dist.models import build_model

PAGE = mmap.PAGESIZE
MIB = 2**20
CPU = torch.device("cpu")


def status():
    fields = ("VmRSS", "RssAnon", "RssFile")
    return {line.split(":")[0]: int(line.split()[1]) / 1024
            for line in open("/proc/self/status") if line.split(":")[0] in fields}


def file_pages(perms):
    """Present, file-backed (not copied-on-write) pages of private file mappings with perms."""
    pages = set()
    with open("/proc/self/pagemap", "rb") as pagemap:
        for line in open("/proc/self/maps"):
            parts = line.split()
            if len(parts) < 6 or not parts[5].startswith("/") or parts[1] not in perms:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            pagemap.seek(start // PAGE * 8)
            entries = struct.iter_unpack("Q", pagemap.read((end - start) // PAGE * 8))
            pages |= {start + i * PAGE for i, (e,) in enumerate(entries)
                      if e >> 63 & 1 and e >> 61 & 1}
    return pages


def main():
    name, meta_batch, budget, mode, steps = sys.argv[1:6]
    meta_batch, budget, steps = int(meta_batch), float(budget), int(steps)
    perms = {"none": (), "text": ("r-xp",), "clean": ("r-xp", "r--p")}[mode]
    tune_cpu_malloc()
    single_arena()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    case = {"model": name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": meta_batch}
    model = build_model(name, 5, **model_options(case))
    tasks = synthetic_tasks(case, CPU)
    state = bench_state(case_config(case, 1.0), model)
    gc.collect()
    release_free_memory()
    before, s0 = held_bytes(CPU), status()
    snapshot = {p: file_pages((p,)) for p in ("r-xp", "r--p")}
    config = case_config(case, (before + budget * MIB) / GB)
    plan, record = plan_memory(state, tasks, config, "no", Distributed())
    new = {p: file_pages((p,)) - snapshot[p] for p in snapshot}
    s1 = status()
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for p in perms:
        for address in new[p]:
            assert libc.madvise(address, PAGE, 4) == 0  # MADV_DONTNEED
    gc.collect()
    release_free_memory()
    after, s2 = held_bytes(CPU), status()
    spec, arguments = apply_to_spec(case_spec(case), plan), plan_arguments(plan)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    base = reset_peak_rss()
    peaks = []
    for _ in range(1 + steps):
        optimizer.zero_grad(set_to_none=True)
        meta_backward(model, tasks, spec, acc_before=False, **arguments)
        optimizer.step()
        peaks.append((peak_rss() - base) / MIB)
    s3 = status()
    left = (after - before) / MIB
    print(json.dumps({
        "plan": record["name"], "mode": mode,
        "code_released_mib": record.get("code_released_gb", 0) * GB / MIB,
        "new_text_mib": len(new["r-xp"]) * PAGE / MIB,
        "new_ro_mib": len(new["r--p"]) * PAGE / MIB,
        "planning_left_mib": round(left, 1), "train_peak_mib": round(max(peaks), 1),
        "row_mib": round(left + max(peaks), 1), "budget_mib": budget,
        "file_before_plan_after_drop_train": [s["RssFile"] for s in (s0, s1, s2, s3)],
        "anon": [s["RssAnon"] for s in (s0, s1, s2, s3)]}))


main()
