"""meta_backward, the trainer's path: the same meta-gradient as meta_loss + backward (checked
against finite differences in float64), independent of the number of worker threads, and
the accuracy-before statistic skipped on request."""

import math
import os

import pytest
import torch

from fsl_dist.meta import (
    ALGORITHMS,
    InnerLoopSpec,
    LearnedInnerLR,
    evaluate_tasks,
    meta_backward,
    meta_loss,
)

from meta_helpers import SETTINGS, check_against_finite_differences, make_tasks, tiny_model


def leaves_of(model, inner_lr):
    extra = list(inner_lr.parameters()) if isinstance(inner_lr, torch.nn.Module) else []
    return list(model.parameters()) + extra


def backward_grads(model, tasks, inner_lr, algorithm, **options):
    leaves = leaves_of(model, inner_lr)
    for p in leaves:
        p.grad = None
    stats = meta_backward(model, tasks, InnerLoopSpec(algorithm, inner_steps=2, inner_lr=inner_lr),
                          **options)
    return [p.grad.clone() for p in leaves], stats


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_meta_backward_matches_finite_differences(algorithm, workers):
    model, tasks = tiny_model(), make_tasks()
    inner_lr = LearnedInnerLR(model, algorithm, SETTINGS["inner_lr"]).double()
    params = leaves_of(model, inner_lr)
    grads, _ = backward_grads(model, tasks, inner_lr, algorithm, workers=workers, loss_scale=4.0)

    def loss_fn():
        return 4.0 * meta_loss(model, tasks, InnerLoopSpec(algorithm, inner_steps=2,
                                                           inner_lr=inner_lr))[0]
    check_against_finite_differences(loss_fn, params)
    reference = torch.autograd.grad(loss_fn(), params)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_worker_threads_give_bitwise_the_serial_result(algorithm):
    """Each task runs on one intra-op thread and the sum runs in task order, so 1, 2 or 3
    workers (and 1 or 2 processes with one thread each) compute the same bits."""
    model, tasks = tiny_model(torch.float32), make_tasks(tasks=5, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial, serial_stats = backward_grads(model, tasks, 0.4, algorithm, workers=1)
    finally:
        torch.set_num_threads(threads)
    for workers in (2, 3):
        grads, stats = backward_grads(model, tasks, 0.4, algorithm, workers=workers)
        assert all(torch.equal(a, b) for a, b in zip(grads, serial))
        assert ({k: v.item() for k, v in stats.items()}
                == {k: v.item() for k, v in serial_stats.items()})
    assert torch.get_num_threads() == threads  # restored after the workers ran


def test_worker_threads_share_the_models_weights_instead_of_copying_them():
    """A worker thread's replica has its own modules (``functional_call`` swaps tensors into a
    module while a task runs) but the model's own parameter tensors, never used (every call
    passes its own): side-by-side tasks do not hold the weights once more per thread."""
    from fsl_dist.meta.objective import _REPLICAS
    model, tasks = tiny_model(torch.float32), make_tasks(tasks=4, dtype=torch.float32)
    assert not list(model.buffers())  # a model with buffers runs without replicas
    before = [p.detach().clone() for p in model.parameters()]
    backward_grads(model, tasks, 0.4, "maml", workers=2)
    replicas = _REPLICAS[model]
    assert len(replicas) == 2
    for replica in replicas:
        assert all(a is not b for a, b in zip(replica.modules(), model.modules(), strict=True))
        assert all(a is b for a, b in zip(replica.parameters(), model.parameters(), strict=True))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_gradient_accumulates_like_backward_and_acc_before_is_optional():
    model, tasks = tiny_model(), make_tasks()
    once, stats = backward_grads(model, tasks, 0.4, "maml", acc_before=False)
    assert math.isnan(stats["acc_before"].item()) and 0 <= stats["acc_after"].item() <= 1
    meta_backward(model, tasks, InnerLoopSpec("maml", inner_steps=2, inner_lr=0.4))  # adds to .grad
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g)


def test_evaluation_in_worker_threads_matches_serial():
    model, tasks = tiny_model(torch.float32), make_tasks(tasks=5, dtype=torch.float32)
    spec = InnerLoopSpec("maml", inner_steps=3, inner_lr=0.4)
    serial = evaluate_tasks(model, tasks, spec, workers=1)
    threaded = evaluate_tasks(model, tasks, spec, workers=2)
    torch.testing.assert_close(threaded["acc_after_per_task"], serial["acc_after_per_task"])
    torch.testing.assert_close(threaded["query_loss"], serial["query_loss"])


def test_default_workers_run_small_tasks_side_by_side_and_large_ones_alone():
    """Omniglot-sized tasks run one per intra-op thread, 84x84 tasks one at a time on all
    threads (the measured choice, BENCHMARKS.md), and CUDA one at a time."""
    from fsl_dist.meta.objective import (
        SIDE_BY_SIDE_MAX_PIXELS,
        default_task_workers,
        pixels_per_task,
    )
    omniglot = {"support_x": torch.zeros(2, 5, 1, 28, 28), "query_x": torch.zeros(2, 75, 1, 28, 28)}
    mini = {"support_x": torch.zeros(2, 5, 3, 84, 84), "query_x": torch.zeros(2, 75, 3, 84, 84)}
    assert pixels_per_task(omniglot) == 80 * 28 * 28 < SIDE_BY_SIDE_MAX_PIXELS
    assert pixels_per_task(mini) == 80 * 84 * 84 > SIDE_BY_SIDE_MAX_PIXELS
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert default_task_workers("cpu", pixels_per_task(omniglot)) == 2
        assert default_task_workers("cpu") == 2
        assert default_task_workers("cpu", pixels_per_task(mini)) == 1
        assert default_task_workers("cuda", pixels_per_task(omniglot)) == 1
    finally:
        torch.set_num_threads(threads)


def test_task_results_are_consumed_in_task_order_and_not_kept():
    """A task that finishes before an earlier one waits; every result is handed over as soon as
    the tasks before it are, not when all have run (what lets the heap be reused)."""
    import threading
    import time

    from fsl_dist.meta.objective import _each_task_in_order

    model = torch.nn.Linear(2, 2)  # no buffers: the tasks run in worker threads
    finished, consumed, lock = [], [], threading.Lock()

    def fn(i, module):
        time.sleep(0.05 if i % 2 == 0 else 0.0)  # the odd tasks finish first
        with lock:
            finished.append(i)
        return i * 10

    def consume(i, result):
        consumed.append((i, result, len(finished)))

    _each_task_in_order(fn, 7, model, 2, consume)
    assert [(i, r) for i, r, _ in consumed] == [(i, 10 * i) for i in range(7)]
    assert finished != sorted(finished)  # the order was really tested
    assert consumed[0][2] < 7  # task 0's result went on before the last task had finished


@pytest.mark.integration
def test_loop_peak_memory_does_not_grow_with_the_meta_batch(tmp_path):
    """With fsl_dist's allocator settings (a heap that is never trimmed), the loop's peak is one
    task's, not one per task: each task's gradient used to stay allocated between the next
    task's activations until the end, and the heap grew by a task's activations per task
    (Conv-4 28x28 5w1s15q: 16 MiB per task)."""
    import json
    import subprocess
    import sys

    script = r'''
import json, sys, torch
from fsl_dist.cpu_malloc import tune_cpu_malloc
from fsl_dist.bench.cases import synthetic_tasks
from fsl_dist.bench.measure import peak_rss, reset_peak_rss
from fsl_dist.meta import InnerLoopSpec, meta_backward
from fsl_dist.models import build_model
tune_cpu_malloc()
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model("cnn", 5)
case = {"n_way": 5, "k_shot": 1, "n_query": 15, "meta_batch": int(sys.argv[1])}
tasks = synthetic_tasks(case, "cpu")
spec = InnerLoopSpec("maml", inner_steps=1, inner_lr=0.4, vectorize=False)
base = reset_peak_rss()  # before the first step: the heap it grows is never trimmed
for _ in range(2):
    meta_backward(model, tasks, spec, workers=1)
print(json.dumps((peak_rss() - base) / 2**20))
'''
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    peaks = {}
    for n in (2, 12):
        out = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True,
                             text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks[12] - peaks[2] < 60, peaks  # 52 MiB for 2 against 8 tasks before the fix
