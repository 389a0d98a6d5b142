"""What one blocks task holds per inner step: the bytes glibc has handed out (mallinfo2:
in-use heap chunks plus mmapped chunks, i.e. what tensors and the rest hold) against the
process's RSS, both above the values just before the task, sampled every 0.5 ms.

    PYTHONPATH=. OMP_NUM_THREADS=1 python docs/benchmarks/2026-12-05-memory-per-task/growth.py \
        STEPS [IMAGE_SIZE] [--glibc-malloc-defaults]

The benchmark's row (fsl_dist/bench/memory.py): ResNet-12 (64-160-320-640), 5w1s15q, MAML
second order, algorithm.checkpoint=blocks, the trainer's allocator settings unless
--glibc-malloc-defaults; one task, one fresh process per run. Prints the peaks and, per phase
(the inner loop, the query forward, the backward outside and inside the inner loop's
``Recomputed`` backwards), the largest RSS and in-use bytes sampled in it and how much the
RSS high-water mark (VmHWM) rose while in it.
"""
import ctypes
import gc
import sys
import threading
import time

import torch

from fsl_dist.bench.cases import synthetic_tasks
from fsl_dist.bench.measure import peak_rss, reset_peak_rss
from fsl_dist.cpu_malloc import tune_cpu_malloc
from fsl_dist.meta import InnerLoopSpec, recompute
from fsl_dist.meta import objective as O
from fsl_dist.models import build_model

MIB = 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks "
                "fsmblks uordblks fordblks keepcost".split()]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2


def in_use() -> int:
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def high_water() -> int:
    """VmHWM: never missed by sampling, however brief the peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


phase = ["setup"]
_backward = recompute.Recomputed.backward


def labelled_backward(ctx, *grads):
    # Each Recomputed backward (one block of one inner step) is a phase of its own.
    before, phase[0] = phase[0], "inner loop's Recomputed backwards"
    try:
        return _backward(ctx, *grads)
    finally:
        phase[0] = before


recompute.Recomputed.backward = staticmethod(labelled_backward)


def main(steps: int, size: int, tuned: bool) -> None:
    tune_cpu_malloc(tuned)
    torch.manual_seed(0)
    case = {"model": "resnet12", "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "meta_batch": 1, "image_size": size, "channels": 3}
    model = build_model("resnet12", 5, width=64, in_channels=3, image_size=size)
    tasks = synthetic_tasks(case, torch.device("cpu"))
    spec = InnerLoopSpec("maml", steps, 0.4, vectorize=False, checkpoint="blocks")
    plan, _ = O._plan(model, spec, "cpu", False, acc_before=False)
    lrs = O.resolve_inner_lr(spec.inner_lr, plan.adapted_names)
    params = dict(model.named_parameters())
    adapt_task = O._adapt_task

    def labelled_adapt(*args, **kwargs):
        phase[0] = "inner loop forward"
        done = adapt_task(*args, **kwargs)
        phase[0] = "query forward"
        return done
    O._adapt_task = labelled_adapt
    gc.collect()
    base_in_use, base_rss, base_hwm = in_use(), rss(), reset_peak_rss()
    seen, stop, last_hwm = {}, [], [high_water()]

    def sample():
        while not stop:
            row = seen.setdefault(phase[0], [0, 0, 0])
            row[0] = max(row[0], rss() - base_rss)
            row[1] = max(row[1], in_use() - base_in_use)
            hwm = high_water()
            row[2] += hwm - last_hwm[0]  # the high-water's rise while in this phase
            last_hwm[0] = hwm
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    results = O._one_task(model, params, lrs, plan, *(tasks[k][0] for k in O.TASK_KEYS))
    after_forward = in_use() - base_in_use
    phase[0] = "backward outside the Recomputed backwards (the query's first)"
    torch.autograd.grad(results[0], list(params.values()), allow_unused=True)
    stop.append(True)
    sampler.join()
    print(f"blocks, {steps} steps, {size}x{size}, {'tuned' if tuned else 'glibc defaults'}: "
          f"peak RSS above start {(peak_rss() - base_hwm) / MIB:.0f} MiB; peak in use "
          f"{max(r[1] for r in seen.values()) / MIB:.0f} MiB; in use after the forward "
          f"{after_forward / MIB:.1f} MiB")
    for name, (most_rss, most_in_use, rise) in seen.items():
        print(f"  {name}: RSS up to {most_rss / MIB:.0f}, in use up to {most_in_use / MIB:.0f}"
              f" (sampled); high-water rose {rise / MIB:.0f}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(int(args[0]), int(args[1]) if len(args) > 1 else 84,
         "--glibc-malloc-defaults" not in sys.argv)
