"""The benchmark's methods: fsl_dist's paths, the peers (learn2learn, higher, TorchOpt), the
lever rows and the plain-autograd reference whose FLOP are counted (see ``fsl_dist.bench``).

Each method is a factory ``make(model, tasks, case) -> backward()``; ``backward()`` puts the
case's meta-gradient into the ``.grad`` fields of the model's parameters.
"""

import torch
import torch.nn.functional as F

from fsl_dist.meta import InnerLoopSpec, adapt, adapted_parameter_names, meta_backward, meta_loss
from fsl_dist.meta.objective import TASK_KEYS
from fsl_dist.models.layers import batch_norm_for_vmap

INNER_LR = 0.4
PEERS = ("learn2learn", "higher", "torchopt")


class Unavailable(Exception):
    """A method that cannot run here (not installed, fails to import); the table says why."""


def case_spec(case, **options) -> InnerLoopSpec:
    """The case's inner loop (second order, step size ``INNER_LR``) under ``options``."""
    return InnerLoopSpec(case["algorithm"], case["inner_steps"], INNER_LR, **options)


# --- fsl_dist's paths ---------------------------------------------------------------------------

def fsl_dist_method(workers=None, **options):
    """fsl_dist's trainer path, ``fsl_dist.meta.meta_backward`` with the ``InnerLoopSpec``
    fields ``options`` (and ``workers``: a count, None for the default, or "threads" for one
    task per intra-op thread), without the accuracy-before statistic (the trainer computes it on
    logged steps only)."""
    def make(model, tasks, case):
        spec = case_spec(case, **options)
        count = torch.get_num_threads() if workers == "threads" else workers

        def backward():
            meta_backward(model, tasks, spec, acc_before=False, workers=count)
        return backward
    return make


def meta_loss_method(model, tasks, case):
    """The earlier trainer path: ``meta_loss`` (every task's graph kept, accuracy before
    adaptation computed) and one backward. Measures what ``meta_backward`` bought."""
    spec = case_spec(case, vectorize=False)

    def backward():
        loss, _ = meta_loss(model, tasks, spec)
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


# --- the peers ----------------------------------------------------------------------------------

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


def _planned(model, tasks, case):
    from .planned import planned_method  # imports the trainer: only in this method's rows
    return planned_method(model, tasks, case)


# --- the table of methods -----------------------------------------------------------------------

# name -> (applies to case?, factory(model, tasks, case) -> backward()). "loop" is the CPU
# default of launch/train.py (small tasks side by side in worker threads, large ones one at a
# time), "vmap" the CUDA default; "default, bf16" is the device's default path under bf16
# autocast.
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
    "loop, side by side": (lambda case: True, fsl_dist_method(vectorize=False, workers="threads")),
    "loop, meta_loss + backward": (lambda case: True, meta_loss_method),
    "compiled": (lambda case: case["algorithm"] != "anil", compiled_method),
    "loop, glibc malloc defaults": (lambda case: True, fsl_dist_method(vectorize=False)),
    "learn2learn, tuned malloc": (lambda case: True, peer_method(learn2learn_task)),
    "higher, tuned malloc": (lambda case: True, peer_method(higher_task)),
    "torchopt, tuned malloc": (lambda case: True, peer_method(torchopt_task)),
    # train.memory_budget_gb with the lightest peer's peak (or --plan-budget-mib): planned.py
    "loop, memory plan": (lambda case: True, _planned),
}
LEVERS = ("loop, serial", "loop, side by side", "loop, meta_loss + backward", "compiled",
          "loop, memory plan", "loop, glibc malloc defaults", "learn2learn, tuned malloc",
          "higher, tuned malloc", "torchopt, tuned malloc")
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
