"""Meta-step speed, memory, FLOP rate and meta-gradient agreement: fsl_dist vs its peers.

One table for fsl_dist's execution paths and for learn2learn, higher and TorchOpt.

A case is (model, algorithm, task shape, inner steps, meta-batch); a method is a way to compute
the meta-gradient: fsl_dist's ``loop`` and ``vmap`` paths (and ANIL without feature reuse), and
the peers ``learn2learn`` (``l2l.algorithms.MAML``, clone/adapt), ``higher``
(``innerloop_ctx`` + differentiable SGD) and ``torchopt`` (``MetaSGD`` with
``extract_state_dict``/``recover_state_dict``). Every method computes the same math: the same
initial weights (seed 0), the same synthetic tasks, inner update ``p - 0.4 * grad(CE support
loss)`` on the parameters the algorithm adapts (MAML: all, BOIL: ``features.*``, ANIL:
``classifier.*``), second order, meta-loss = mean query CE over the tasks.

How the peers run (each library's own idiom, tasks in a per-task loop): the module that adapts
is the whole model (MAML), ``model.features`` (BOIL) or ``model.classifier`` (ANIL) and the rest
of the model is used as a plain module around it, so its parameters are meta-learned but not
adapted; for ANIL the body's features are computed once per task (support and query
separately, as fsl_dist's ANIL path and learn2learn's ANIL example do); each task's query loss
is divided by the meta-batch and back-propagated right away (as in the libraries' MAML
examples), which sums to the gradient of the mean.

A step is the meta-gradient + an Adam step on synthetic binary 28x28 images. Each row runs in
its own process, so its peak memory (CPU: the RSS high-water mark, reset just before the first
step, above the RSS then; GPU: ``torch.cuda.max_memory_allocated``) is its own. Before timing,
each row computes its meta-gradient once at the initial weights (float32, on one intra-op
thread for every method, so that thread-count rounding does not mask whether the math agrees);
the table reports, per row, the largest relative difference to fsl_dist's loop path on the same
case: ``max|g - g_loop| / max|g_loop|`` over all parameters (the norm-relative difference
``|g - g_loop| / |g_loop|`` is in the JSON),
and the same measure against the case's meta-gradient in float64 (computed once per case with
the plain-autograd reference below), which shows how far each method's float32 rounding is
from the exact value.

Floating-point work is counted once per case with ``torch.utils.flop_counter.FlopCounterMode``
around one task's meta-gradient on a plain-autograd reference (``reference_task``: the math and
nothing else; ANIL's body features once per task; no statistics such as fsl_dist's accuracy
before adaptation, which costs one more query forward), times the meta-batch; it counts matrix
products and convolutions (forward, backward and the double-backward of the second-order
term), not element-wise ops. The CPU/GPU ceiling is the
median rate of a large float32 and bfloat16 matrix product measured in the same run with the
same thread count. Effective GFLOP/s = counted FLOP per step / median step time.

Lever rows, run only when named with ``--methods``: ``loop, serial`` (one task at a time on all
intra-op threads), ``loop, meta_loss + backward`` (the earlier trainer path), ``compiled``
(``torch.compile`` over each task's whole meta-gradient written with ``torch.func.grad``; MAML
and BOIL), ``loop, glibc malloc defaults`` and ``<peer>, tuned malloc``.

Allocator: on CPU, fsl_dist's rows run with the allocator settings launch/train.py applies
(``fsl_dist/cpu_malloc.py``: glibc keeps freed activations instead of returning them to the
kernel), the peers' rows as the libraries ship, in glibc's defaults. The lever rows
``loop, glibc malloc defaults`` (fsl_dist without the settings) and ``<peer>, tuned malloc``
(the peer with them) show what the settings buy each side. A ``MALLOC_*_`` variable, malloc
settings in ``GLIBC_TUNABLES`` or ``LD_PRELOAD`` in the environment reach every row and turn
fsl_dist's settings off (the machine line says which).

    python launch/bench.py                    # full grid (48 cases): hours on 2 CPU cores
    python launch/bench.py --quick            # smoke run: 5-way 1-shot, 1 step, meta-batch 8
    python launch/bench.py --device cuda --json runs/bench.json
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fsl_dist.cpu_malloc import reason_to_leave_alone, tune_cpu_malloc  # noqa: E402
from fsl_dist.io import atomic_write_text  # noqa: E402
from fsl_dist.meta import adapt, adapted_parameter_names, meta_backward, meta_loss  # noqa: E402
from fsl_dist.meta.objective import TASK_KEYS  # noqa: E402
from fsl_dist.meta.precision import cpu_flags  # noqa: E402
from fsl_dist.models.layers import batch_norm_for_vmap  # noqa: E402
from fsl_dist.models import build_model  # noqa: E402

INNER_LR = 0.4
# (n_way, k_shot, n_query) task shapes of the full grid.
TASK_SHAPES = ((5, 1, 15), (20, 1, 5))
PEERS = ("learn2learn", "higher", "torchopt")


class Unavailable(Exception):
    """A method that cannot run here (not installed, fails to import); the table says why."""


# --- methods: each returns backward(), which puts the meta-gradient into the .grad fields ----

def fsl_dist_method(**options):
    """fsl_dist's trainer path, ``fsl_dist.meta.meta_backward`` under ``options``, without the
    accuracy-before statistic (the trainer computes it on logged steps only)."""
    def make(model, tasks, case):
        def backward():
            meta_backward(model, tasks, algorithm=case["algorithm"], acc_before=False,
                          inner_steps=case["inner_steps"], inner_lr=INNER_LR, **options)
        return backward
    return make


def meta_loss_method(model, tasks, case):
    """The earlier trainer path: ``meta_loss`` (every task's graph kept, accuracy before
    adaptation computed) and one backward. Measures what ``meta_backward`` bought."""
    def backward():
        loss, _ = meta_loss(model, tasks, algorithm=case["algorithm"], vectorize=False,
                            inner_steps=case["inner_steps"], inner_lr=INNER_LR)
        loss.backward()
    return backward


def compiled_method(model, tasks, case):
    """Lever: ``torch.compile`` over each task's whole second-order meta-gradient.

    The meta-gradient is written as ``torch.func.grad`` of the query loss after an inner loop of
    ``torch.func.grad`` steps, so the compiled graph is forward-only: inductor sees the double
    backward as plain ops and can fuse its element-wise work (batch norm, ReLU, pooling
    backward). Batch norm in its written-out form (exact under torch.func); tasks in a loop on
    torch's intra-op threads; the first call compiles (a warm-up step, not timed)."""
    import torch._inductor.config as inductor_config
    from torch.func import functional_call, grad
    # Kernels read the thread count when they run: the meta-gradient check runs on one thread,
    # the timed steps on --threads.
    inductor_config.cpp.dynamic_threads = True
    names = adapted_parameter_names(case["algorithm"], [n for n, _ in model.named_parameters()])
    lrs = {n: INNER_LR for n in names}

    def forward(params, x):
        return functional_call(model, params, (x,))

    def task_loss(params, sx, sy, qx, qy):
        adapted = adapt(forward, params, sx, sy, adapted_names=names, lrs=lrs,
                        steps=case["inner_steps"], functional=True).params
        return F.cross_entropy(forward(adapted, qx), qy)

    task_gradient = torch.compile(grad(task_loss))
    batch = [tasks[k] for k in TASK_KEYS]
    n_tasks = batch[0].shape[0]

    def backward():
        params = {n: p.detach() for n, p in model.named_parameters()}
        total = None
        with batch_norm_for_vmap():
            for task in zip(*batch):
                grads = task_gradient(params, *task)
                total = grads if total is None else {n: total[n] + g for n, g in grads.items()}
        for n, p in model.named_parameters():
            p.grad = total[n] / n_tasks
    return backward


def adapted_part(model, algorithm):
    """The sub-module that adapts in the inner loop (the rest is used as a plain module)."""
    return {"maml": model, "boil": model.features, "anil": model.classifier}[algorithm]


def peer_forward(model, algorithm):
    """``forward(adapted, x)``: logits from the adapted sub-module ``adapted`` (for ANIL, ``x``
    are the body's features, computed once per task)."""
    if algorithm == "boil":
        return lambda adapted, x: model.classifier(adapted(x))
    return lambda adapted, x: adapted(x)


def peer_method(run_task_factory):
    """A peer method: tasks in a loop, each task's query loss / T back-propagated right away.

    ``run_task_factory(model, case) -> run_task(sx, sy, qx, qy) -> query loss``.
    """
    def make(model, tasks, case):
        run_task = run_task_factory(model, case)
        algorithm = case["algorithm"]
        n_tasks = tasks["support_x"].shape[0]

        def backward():
            for sx, sy, qx, qy in zip(tasks["support_x"], tasks["support_y"],
                                      tasks["query_x"], tasks["query_y"]):
                if algorithm == "anil":  # body features once per task, as fsl_dist's ANIL path
                    sx, qx = model.features(sx), model.features(qx)
                (run_task(sx, sy, qx, qy) / n_tasks).backward()
        return backward
    return make


def _import(name):
    try:
        return __import__(name)
    except Exception as error:  # noqa: BLE001 - any failure to import is a reason to report
        raise Unavailable(f"import {name} failed: {type(error).__name__}: {error}") from error


def learn2learn_task(model, case):
    l2l = _import("learn2learn")
    maml = l2l.algorithms.MAML(adapted_part(model, case["algorithm"]), lr=INNER_LR,
                               first_order=False)
    forward = peer_forward(model, case["algorithm"])

    def run_task(sx, sy, qx, qy):
        learner = maml.clone()
        for _ in range(case["inner_steps"]):
            learner.adapt(F.cross_entropy(forward(learner, sx), sy))
        return F.cross_entropy(forward(learner, qx), qy)
    return run_task


def higher_task(model, case):
    higher = _import("higher")
    part = adapted_part(model, case["algorithm"])
    inner_opt = torch.optim.SGD(part.parameters(), lr=INNER_LR)
    forward = peer_forward(model, case["algorithm"])

    def run_task(sx, sy, qx, qy):
        with higher.innerloop_ctx(part, inner_opt, copy_initial_weights=False,
                                  track_higher_grads=True) as (fpart, diffopt):
            for _ in range(case["inner_steps"]):
                diffopt.step(F.cross_entropy(forward(fpart, sx), sy))
            return F.cross_entropy(forward(fpart, qx), qy)
    return run_task


def torchopt_task(model, case):
    torchopt = _import("torchopt")
    part = adapted_part(model, case["algorithm"])
    inner_opt = torchopt.MetaSGD(part, lr=INNER_LR)
    forward = peer_forward(model, case["algorithm"])

    def run_task(sx, sy, qx, qy):
        part_state = torchopt.extract_state_dict(part, by="reference")
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
        try:
            for _ in range(case["inner_steps"]):
                inner_opt.step(F.cross_entropy(forward(part, sx), sy))
            return F.cross_entropy(forward(part, qx), qy)
        finally:  # the original parameters back into the module (the graph keeps the adapted)
            torchopt.recover_state_dict(part, part_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
    return run_task


def reference_task(model, case):
    """The meta-gradient math written out with plain autograd and nothing else (no statistics,
    no extra forward passes): what the FLOP count measures. Not timed."""
    from torch.func import functional_call
    part = adapted_part(model, case["algorithm"])  # every parameter of it adapts
    forward = peer_forward(model, case["algorithm"])
    params = dict(part.named_parameters())
    names = list(params)

    def run_task(sx, sy, qx, qy):
        fast = dict(params)
        call = lambda x: forward(lambda x_: functional_call(part, fast, (x_,)), x)  # noqa: E731
        for _ in range(case["inner_steps"]):
            grads = torch.autograd.grad(F.cross_entropy(call(sx), sy),
                                        [fast[n] for n in names], create_graph=True)
            fast = {**fast, **{n: fast[n] - INNER_LR * g for n, g in zip(names, grads)}}
        return F.cross_entropy(call(qx), qy)
    return run_task


# name -> (applies to case?, factory(model, tasks, case) -> backward()). "loop" is the CPU
# default of launch/train.py (tasks in worker threads), "vmap" the CUDA default; "default,
# bf16" is the device's default path under bf16 autocast.
METHODS = {
    "loop": (lambda case: True, fsl_dist_method(vectorize=False)),
    "vmap": (lambda case: True, fsl_dist_method(vectorize=True)),
    "default, bf16": (lambda case: case["algorithm"] == "maml",
                      fsl_dist_method(precision="bf16")),
    "loop, no feature reuse": (lambda case: case["algorithm"] == "anil",
                               fsl_dist_method(vectorize=False, reuse_features=False)),
    "learn2learn": (lambda case: True, peer_method(learn2learn_task)),
    "higher": (lambda case: True, peer_method(higher_task)),
    "torchopt": (lambda case: True, peer_method(torchopt_task)),
    # Levers, not run unless named with --methods:
    "loop, serial": (lambda case: True, fsl_dist_method(vectorize=False, workers=1)),
    "loop, meta_loss + backward": (lambda case: True, meta_loss_method),
    "compiled": (lambda case: case["algorithm"] != "anil", compiled_method),
    "loop, glibc malloc defaults": (lambda case: True, fsl_dist_method(vectorize=False)),
    "learn2learn, tuned malloc": (lambda case: True, peer_method(learn2learn_task)),
    "higher, tuned malloc": (lambda case: True, peer_method(higher_task)),
    "torchopt, tuned malloc": (lambda case: True, peer_method(torchopt_task)),
}
LEVERS = ("loop, serial", "loop, meta_loss + backward", "compiled", "loop, glibc malloc defaults",
          "learn2learn, tuned malloc", "higher, tuned malloc", "torchopt, tuned malloc")
DEFAULT_METHODS = [m for m in METHODS if m not in LEVERS]
REFERENCE = peer_method(reference_task)  # for counting FLOP


def tunes_malloc(method: str) -> bool:
    """Whether the row runs with fsl_dist's allocator settings (fsl_dist/cpu_malloc.py), as
    launch/train.py does on CPU: fsl_dist's rows and the peers' "tuned malloc" lever rows; not
    the peers as shipped, nor the lever row that shows what the settings buy."""
    return method not in PEERS and method != "loop, glibc malloc defaults"


def peer_versions() -> dict:
    """{peer: installed version, or "not installed"}, for the report, read from the package
    metadata without importing the peers (learn2learn alone takes 6 s to import here, with
    gym and scipy); a peer that is installed but fails to import says why in its rows."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in PEERS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# --- cases and tasks --------------------------------------------------------------------------

def parse_task(name: str) -> tuple:
    """"5w1s15q" -> (5, 1, 15)."""
    import re
    match = re.fullmatch(r"(\d+)w(\d+)s(\d+)q", name)
    if not match:
        raise argparse.ArgumentTypeError(
            f"task {name!r}: expected N-way K-shot Q-query as e.g. 5w1s15q")
    return tuple(int(g) for g in match.groups())


def cases(quick: bool, models=("cnn", "resnet"), algorithms=("maml", "boil", "anil"),
          inner_steps=None, meta_batches=None, shapes=None):
    shapes = shapes or (TASK_SHAPES[:1] if quick else TASK_SHAPES)
    steps = inner_steps or ((1,) if quick else (1, 5))
    batches = meta_batches or ((8,) if quick else (8, 32))
    return [{"model": m, "algorithm": a, "n_way": n, "k_shot": k, "n_query": q,
             "inner_steps": s, "meta_batch": b}
            for m in models for a in algorithms for (n, k, q) in shapes
            for s in steps for b in batches]


def task_name(case) -> str:
    return f"{case['n_way']}w{case['k_shot']}s{case['n_query']}q"


def synthetic_tasks(case, device, meta_batch=None, image_size=28):
    """Binary 28x28 images (20% ones) and class labels; the same for every method (seed 0)."""
    meta_batch = case["meta_batch"] if meta_batch is None else meta_batch
    n_way = case["n_way"]
    g = torch.Generator().manual_seed(0)

    def images(n):
        x = torch.rand(meta_batch, n, 1, image_size, image_size, generator=g) < 0.2
        return x.float().to(device)

    def labels(per_class):
        return torch.arange(n_way).repeat(per_class).expand(meta_batch, -1).contiguous().to(device)
    return {"support_x": images(n_way * case["k_shot"]), "support_y": labels(case["k_shot"]),
            "query_x": images(n_way * case["n_query"]), "query_y": labels(case["n_query"])}


def meta_gradient(backward, model) -> torch.Tensor:
    """``backward``'s meta-gradient at the model's current weights, flattened in parameter order."""
    for p in model.parameters():
        p.grad = None
    backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return torch.cat([g.detach().reshape(-1) for g in grads])


def float64_gradient(case) -> torch.Tensor:
    """The case's meta-gradient in float64 (plain-autograd reference, CPU): the truth that the
    float32 methods' rounding is measured against."""
    torch.manual_seed(0)
    model = build_model(case["model"], case["n_way"]).double()
    tasks = {k: v.double() if v.is_floating_point() else v
             for k, v in synthetic_tasks(case, "cpu").items()}
    return meta_gradient(REFERENCE(model, tasks, case), model)


def agreement(grad: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (grad.double() - reference.double())
    ref = reference.double()
    return {"max_rel_diff": (diff.abs().max() / ref.abs().max()).item(),
            "norm_rel_diff": (diff.norm() / ref.norm()).item(),
            "cosine": F.cosine_similarity(grad.double(), ref, dim=0).item()}


# --- measurement --------------------------------------------------------------------------------

def count_flops(case, device="cpu") -> float:
    """FLOP of one meta-step's meta-gradient over the case's meta-batch, counted on the plain
    autograd reference (``reference_task``: the math and nothing else) for one task under
    FlopCounterMode, times the meta-batch."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = build_model(case["model"], case["n_way"]).to(device)
    tasks = synthetic_tasks(case, device, meta_batch=1)
    counter = FlopCounterMode(display=False)
    with counter:
        REFERENCE(model, tasks, case)()
    return float(counter.get_total_flops()) * case["meta_batch"]


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


def run_row(spec: dict) -> dict:
    """Measure one (case, method) in this process."""
    if spec["device"] == "cpu" and tunes_malloc(spec["method"]):
        tune_cpu_malloc()
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    case = spec["case"]
    model = build_model(case["model"], case["n_way"]).to(device)
    tasks = synthetic_tasks(case, device)
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
    # The meta-gradient at the initial weights (also the first warm-up step's work), on one
    # intra-op thread for every method: kernels sum in another order on two threads, which in
    # float32 moves a ResNet meta-gradient by ~1e-4 (as far as float32 is from float64 here) and
    # would hide whether two methods compute the same math.
    if spec.get("grad_out"):  # the first round of a row; later rounds only time it
        torch.set_num_threads(1)
        grad = meta_gradient(backward, model)
        torch.set_num_threads(spec["threads"])
        torch.save(grad.float().cpu(), spec["grad_out"])
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    median = statistics.median(times)
    return {"s_per_step": median, "tasks_per_s": case["meta_batch"] / median,
            "peak_mem_mib": peak / 2**20, "steps": spec["steps"], "warmup": spec["warmup"],
            "step_times": times}


def run_in_subprocess(spec: dict, timeout: float) -> dict:
    """The row's result, ``{"unavailable": why}`` or ``{"error": why}``."""
    try:
        out = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout)
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


# --- report ---------------------------------------------------------------------------------------

HEADER = ["model", "algorithm", "task", "inner steps", "meta-batch", "method", "tasks/s",
          "s/step", "peak mem (MiB)", "GFLOP/step", "GFLOP/s", "% fp32 ceiling",
          "x best peer", "max rel. diff vs loop", "max rel. diff vs float64", "cosine vs float64"]


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(rows) -> str:
    lines = ["| " + " | ".join(HEADER) + " |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = (f"| {r['model']} | {r['algorithm']} | {task_name(r)} | {r['inner_steps']} "
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


# CPU features that change the speed of these rows by large factors: two machines with the same
# model name ("Intel(R) Xeon(R) Processor") measured bf16 products at 63 and 2,137 GFLOP/s.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> str:
    """Model name and the speed-relevant ISA flags from /proc/cpuinfo (Linux), else platform's."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    present = [f for f in SPEED_FLAGS if f in cpu_flags(info)]
    name = fields.get("model name", platform.machine())
    return f"{name} ({' '.join(present) or 'none of ' + '/'.join(SPEED_FLAGS)})"


def machine_line(device, threads) -> str:
    cpu = torch.cuda.get_device_name() if device.type == "cuda" else cpu_description()
    line = (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python "
            f"{platform.python_version()}, device {device.type}, {threads} threads")
    if device.type == "cpu":  # part of what a row measured, so part of what --resume compares
        reason = reason_to_leave_alone()
        line += ", fsl_dist rows " + (f"in the allocator as is ({reason})" if reason
                                      else "with fsl_dist's glibc malloc settings")
    return line


def check_same_machine(saved: dict, json_path: Path, current: str) -> None:
    """A resumed run must continue on the machine it started on: one table, one machine."""
    if saved.get("machine") != current:
        sys.exit(f"{json_path}: this run was measured on\n  {saved.get('machine')}\nbut this "
                 f"machine is\n  {current}\nResuming would put rows of two machines in one "
                 f"table under the first one's ceiling; start a new run with another --json.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    if args.report and not (args.json and args.json.exists()):
        parser.error(f"--report needs --json naming a file a run wrote (got {args.json})")
    default_steps, default_warmup = (3, 1) if args.quick else (10, 2)
    args.steps = default_steps if args.steps is None else args.steps
    args.warmup = default_warmup if args.warmup is None else args.warmup
    return args


def measure_row_here(row_json: str) -> None:
    """The --row mode: one row's result as the last line of stdout (see run_in_subprocess)."""
    try:
        print(json.dumps(run_row(json.loads(row_json))))
    except Exception:
        traceback.print_exc()
        sys.exit(1)


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

    def measure(self, case, method, grad_out, steps) -> dict:
        if method in self.unavailable:
            return {"unavailable": self.unavailable[method]}
        args = self.args
        spec = {"case": case, "method": method, "device": args.device, "threads": args.threads,
                "steps": steps, "warmup": args.warmup, "grad_out": grad_out}
        result = run_in_subprocess(spec, timeout=args.row_timeout)
        if "unavailable" in result:
            self.unavailable[method] = result["unavailable"]
        elif "error" in result:  # reported in the table; the run goes on
            print(f"row {spec} failed:\n{result.get('stderr')}", file=sys.stderr)
            if method not in PEERS:
                self.failed.append(f"{method} on {case}: {result['error']}")
        return result


def pool_rounds(results: list[dict], meta_batch: int) -> dict:
    """One row from a method's rounds: the median over every timed step of every round, the
    highest peak memory, and each round's own median (how far the machine drifted)."""
    if len(results) == 1 or "tasks_per_s" not in results[0]:
        return results[0]
    failed = [r for r in results if "tasks_per_s" not in r]
    if failed:
        return failed[0]
    times = [t for r in results for t in r["step_times"]]
    median = statistics.median(times)
    return {"s_per_step": median, "tasks_per_s": meta_batch / median,
            "peak_mem_mib": max(r["peak_mem_mib"] for r in results),
            "steps": len(times), "warmup": results[0]["warmup"], "step_times": times,
            "rounds": len(results),
            "round_tasks_per_s": [r["tasks_per_s"] for r in results]}


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


MODEL_NAMES = {"cnn": "Conv-4", "resnet": "ResNet"}


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
        key = (r["model"], r["algorithm"], task_name(r), r["inner_steps"], r["meta_batch"])
        by_case.setdefault(key, {})[r["method"]] = r
    for (model, algorithm, task, steps, meta_batch), methods in by_case.items():
        rate = {m: r["tasks_per_s"] for m, r in methods.items() if "tasks_per_s" in r}
        loop = rate.get("loop")
        peer = max((m for m in PEERS if m in rate), key=rate.get, default=None)
        no_reuse = rate.get("loop, no feature reuse")
        cells = [f"{MODEL_NAMES.get(model, model)} {algorithm.upper()}, {task}, {steps} "
                 f"step{'s' if steps > 1 else ''}, meta-batch {meta_batch}",
                 _fmt(loop, ".2f"),
                 f"{rate[peer]:.2f} ({peer})" if peer else "-",
                 f"{loop / rate[peer]:.2f}x" if loop and peer else "-",
                 *[round_range(methods.get("loop", {}).get("x_best_peer_rounds"))] * with_rounds,
                 _fmt(methods.get("default, bf16", {}).get("cosine_float64"), ".5f"),
                 f"{loop / no_reuse:.2f}x" if loop and no_reuse else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
            f"Per case, the default path against the best peer:\n\n{case_summary(rows)}")


def main(argv=None):
    args = parse_args(argv)
    if args.row:
        return measure_row_here(args.row)
    if args.report:
        saved = json.loads(args.json.read_text())
        print(report(saved, saved["rows"]))
        return
    device = torch.device(args.device)
    earlier = json.loads(args.json.read_text()) if args.resume and args.json.exists() else None
    machine = machine_line(device, args.threads)
    if earlier:  # one machine and one ceiling for every row of the resumed run
        check_same_machine(earlier, args.json, machine)
        ceiling = earlier["ceiling_gflop_per_s"]
    else:
        size, repeats, seconds = (2048, 3, 0.5) if args.quick else (4096, 5, 2.0)
        ceiling = measure_ceiling(device, args.threads, size, repeats, seconds)
    header = {"machine": machine, "peers": peer_versions(),
              "ceiling_gflop_per_s": ceiling, "steps": args.steps, "warmup": args.warmup,
              "rounds": args.rounds}
    print(f"ceiling: {ceiling_line(ceiling)}", file=sys.stderr, flush=True)
    selected = cases(args.quick, args.models, args.algorithms, args.inner_steps,
                     args.meta_batches, args.tasks)
    rows = rows_of_other_cases(earlier["rows"], selected) if earlier else []
    with tempfile.TemporaryDirectory() as tmp:
        measure_case = CaseRunner(args, ceiling, tmp)
        for index, case in enumerate(selected):
            # kept from the run this one resumes, or measured now
            rows += (already_measured(case, earlier["rows"] if earlier else [], args.methods)
                     or measure_case(index, case))
            if args.json:  # after every case, so an interrupted run can be resumed
                # atomic: a killed run leaves the file of its last finished case
                atomic_write_text(args.json, json.dumps(header | {"rows": rows, "complete": False},
                                                        indent=1))
    print(report(header, rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(header | {"rows": rows, "complete": True},
                                                indent=1))
    if measure_case.failed:  # an fsl_dist path failed: the table is written, but the run is an error
        sys.exit("fsl_dist rows failed:\n" + "\n".join(measure_case.failed))


if __name__ == "__main__":
    main()
