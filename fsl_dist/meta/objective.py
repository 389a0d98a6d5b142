"""The meta-objective over a batch of tasks, vectorised with ``vmap`` or in a loop."""

import contextlib
import copy
import math
import threading
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import functional_call

from ..models.layers import (
    batch_norm_for_vmap,
    current_inner_step,
    inner_step,
    no_batch_stats,
    per_step_parameter_names,
    running_stats_norms,
)
from .algorithms import inner_parameter_names, resolve_inner_lr
from .blockwise import Blocks
from .implicit import ProximalProblem, solve_implicit
from .inner import INNER_LOSSES, Adaptation, adapt, cross_entropy, upcast
from .precision import autocast_factory
from .spec import InnerLoopSpec

TASK_KEYS = ("support_x", "support_y", "query_x", "query_y")


def default_vectorize(device, model: nn.Module | None = None) -> bool:
    """Whether ``meta_loss`` runs tasks through ``vmap`` (True) or a loop (False) by default.

    The one place holding the measured choice per device type (BENCHMARKS.md). ``model`` is
    accepted so that a backbone-specific choice can be added where a measurement calls for it.
    """
    device_type = torch.device(device).type
    if model is not None and running_stats_norms(model):
        return False  # per-step running statistics are collected on the loop path only
    if model is not None and native_batch_norms(model):
        return False  # vmap differentiates torch's batch-norm kernel wrongly (second order)
    # CUDA: vmap is several times the loop's tasks/s for every model and algorithm measured.
    # CPU: the loop is faster in most cases at about half the memory. Other devices are
    # unmeasured: take the path that needs no batching rules. Numbers: BENCHMARKS.md.
    return device_type == "cuda"


# Tasks with more pixels than this (images x height x width, support and query together) run one
# at a time on all intra-op threads; smaller ones run side by side. Set between the measured
# cases (BENCHMARKS.md): Omniglot-sized tasks (under 10^5 pixels) gain from side-by-side tasks,
# 84x84 tasks (over 5 x 10^5) lose speed with them and double their memory.
SIDE_BY_SIDE_MAX_PIXELS = 2**18


def default_task_workers(device, task_pixels: int | None = None) -> int:
    """Threads that run the loop path's tasks side by side (each task on one intra-op thread).

    CPU: as many as torch's intra-op threads for small tasks, because small convolutions use
    several threads less well than whole tasks do; 1 for tasks over ``SIDE_BY_SIDE_MAX_PIXELS``,
    whose convolutions keep every thread busy. CUDA: 1 (the GPU takes vmap).
    """
    if torch.device(device).type != "cpu":
        return 1
    if task_pixels is not None and task_pixels > SIDE_BY_SIDE_MAX_PIXELS:
        return 1
    return max(1, torch.get_num_threads())


def pixels_per_task(tasks: Mapping[str, Tensor]) -> int:
    """Images x height x width of one task of the batch, support and query together."""
    support, query = tasks["support_x"], tasks["query_x"]
    return (support.shape[1] + query.shape[1]) * support.shape[-2] * support.shape[-1]


@dataclass(frozen=True)
class _Plan:
    """Everything about the inner loop that is the same for every task of a batch."""

    adapted_names: tuple[str, ...]
    steps: int
    first_order: bool
    inner_loss: str
    loss_scale: float | None
    functional: bool
    reuse_features: bool
    autocast: Callable
    acc_before: bool = True  # False: skip the query forward before adaptation (reported as NaN)
    step_weights: tuple[float, ...] | None = None  # MAML++'s multi-step loss (spec.step_weights)
    checkpoint: str = "none"  # spec.checkpoint: none, steps or blocks
    proximal: float | None = None  # iMAML's lambda (spec.meta_gradient implicit), or None
    implicit: tuple | None = None  # (cg_steps, cg_damping) in training with implicit
    proto_head: bool = False  # Proto-MAML: the head starts from the support set's prototypes


def _strip(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}


def _body_fn(model: nn.Module, autocast, blocks: bool = False):
    """``body(params, x)``: features under autocast, returned in float32 (or float64).
    ``blocks``: each child of ``model.features`` checkpointed while a graph is built (only
    its input kept, its forward recomputed in the backward)."""
    def body(params, x):
        params = _strip(params, "features.")
        with autocast():
            if blocks and torch.is_grad_enabled():
                return upcast(_checkpointed_blocks(model.features, params, x))
            return upcast(functional_call(model.features, params, (x,)))
    return body


def _checkpointed_blocks(features: nn.Module, params: dict, x: Tensor) -> Tensor:
    """``features`` (a sequence of blocks) on ``x``, each block that has parameters under the
    non-reentrant ``torch.utils.checkpoint``, which restores the random state (DropBlock) and
    autocast for the recomputation; ``context_fn`` restores the inner step (per-step batch
    norms) and keeps batch statistics from being collected twice."""
    k = current_inner_step()

    def contexts():
        return contextlib.nullcontext(), _recomputation(k)
    for name, block in features.named_children():
        own = _strip(params, name + ".")
        if own:
            x = torch.utils.checkpoint.checkpoint(functional_call, block, own, (x,),
                                                  use_reentrant=False, context_fn=contexts)
        else:
            x = block(x)
    return x


@contextlib.contextmanager
def _recomputation(k: int):
    with inner_step(k), no_batch_stats():
        yield


def _head_fn(model: nn.Module):
    """``head(params, features)`` in the parameters' precision, outside autocast: the head is
    cheap, and under autocast its weights are rounded to bf16/fp16 at every inner step, which
    rounds away inner updates smaller than 1/256 of a weight (docs/precision.md)."""
    def head(params, features):
        return functional_call(model.classifier, _strip(params, "classifier."), (features,))
    return head


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean()


class _TaskForward(NamedTuple):
    """How one task's images reach logits: ``forward(params, prepare(x))`` in the inner loop,
    ``query(params, prepare(x))`` for the query set (the same function, but with
    ``checkpoint: blocks`` its body's blocks are checkpointed)."""

    forward: Callable  # (params, prepared x) -> logits
    params: dict       # the parameters ``forward`` takes (only the head's on the ANIL path)
    prepare: Callable  # raw images -> what ``forward`` takes
    query: Callable    # as ``forward``, for query sets
    blocks: Blocks | None = None  # ``forward`` split into blocks (checkpoint: blocks)


def splits_body_and_head(model: nn.Module) -> bool:
    """Whether ``model(x)`` is ``model.classifier(model.features(x))`` with every parameter in
    those two (the built-in models declare it): then the head runs outside autocast and ANIL
    computes the body's features once. Any other model runs whole."""
    return getattr(model, "features_then_classifier", False)


def _whole_fn(model: nn.Module, autocast):
    """``forward(params, x)`` of a model that does not split: all of it under autocast."""
    def forward(params, x):
        with autocast():
            return upcast(functional_call(model, params, (x,)))
    return forward


def _task_forward(model, params, plan: _Plan) -> _TaskForward:
    blocks = plan.checkpoint == "blocks"
    if not splits_body_and_head(model):
        if blocks:
            raise ValueError("checkpoint='blocks' splits a model into its `features` blocks and "
                             "its `classifier` (the built-in models); a model of your own "
                             "takes checkpoint='steps'")
        whole = _whole_fn(model, plan.autocast)
        return _TaskForward(whole, params, lambda x: x, whole)
    if plan.reuse_features:
        # ANIL fast path: the body does not adapt, so its features are computed once per
        # image set (support and query separately, as in the full forward, since batch norm
        # uses each batch's statistics) and the inner loop runs on the head alone.
        body = _body_fn(model, plan.autocast, blocks)
        head_params = {n: p for n, p in params.items() if n.startswith("classifier.")}
        return _TaskForward(_head_fn(model), head_params, lambda x: body(params, x),
                            _head_fn(model))
    head = _head_fn(model)

    def full(body):
        return lambda params, x: head(params, body(params, x))
    return _TaskForward(full(_body_fn(model, plan.autocast)), params, lambda x: x,
                        full(_body_fn(model, plan.autocast, blocks)),
                        _split(model, plan.autocast) if blocks else None)


def _split(model: nn.Module, autocast) -> Blocks:
    """The full forward as blocks: each child of ``model.features``, then the head."""
    children = list(model.features.named_children())
    last = children[-1][0]

    def block(name, module):
        prefix = f"features.{name}."

        def forward(params, x):
            with autocast():
                out = functional_call(module, _strip(params, prefix), (x,))
            return upcast(out) if name == last else out
        return forward, tuple(prefix + n for n, _ in module.named_parameters())
    head_names = tuple("classifier." + n for n, _ in model.classifier.named_parameters())
    return Blocks(tuple(block(n, m) for n, m in children), _head_fn(model), head_names)


def _proto_head(model, task: _TaskForward, plan: _Plan, support_in, support_y) -> _TaskForward:
    """Proto-MAML (Triantafillou et al. 2020): the task's linear head starts from the support
    set's prototypes c_k (class means of the body's features), W_k = 2 c_k and
    b_k = -||c_k||^2, so that its logits are the negative squared distances to the prototypes
    up to a term common to all classes; the inner loop starts from there. The prototypes are
    a function of the body's parameters: the meta-gradient flows through them too."""
    if not plan.proto_head:
        return task
    with inner_step(0):
        features = (support_in if plan.reuse_features
                    else _body_fn(model, plan.autocast)(task.params, support_in))
    weight = task.params["classifier.weight"]
    one_hot = torch.nn.functional.one_hot(support_y, weight.shape[0]).to(features.dtype)
    protos = (one_hot.T @ features) / one_hot.sum(0).unsqueeze(1)
    head = {"classifier.weight": (2 * protos).to(weight.dtype),
            "classifier.bias": -(protos ** 2).sum(-1).to(weight.dtype)}
    # The inner loop takes the head as a variable of its own, started at the prototypes: its
    # gradients must not reach the body through them. A view of each body tensor is a new
    # node that only the forward uses (autograd's inner gradient, as torch.func's, then stops
    # there); the meta-gradient still reaches the body by both paths.
    body = {n: p.view_as(p) for n, p in task.params.items() if n not in head}
    return task._replace(params={**body, **head})


def _adapt_task(task: _TaskForward, lrs, plan: _Plan, support_in, support_y):
    """The inner loop of ``plan`` on one prepared support set (``inner.adapt``'s result)."""
    if plan.implicit is not None:
        return _implicit_adapt(task, lrs, plan, support_in, support_y)
    return adapt(task.forward, task.params, support_in, support_y,
                 adapted_names=plan.adapted_names, lrs=lrs, steps=plan.steps,
                 first_order=plan.first_order, inner_loss=plan.inner_loss,
                 loss_scale=plan.loss_scale, functional=plan.functional,
                 keep_steps=plan.step_weights is not None,
                 checkpoint=plan.checkpoint == "steps", blocks=task.blocks,
                 proximal=plan.proximal)


def _implicit_adapt(task: _TaskForward, lrs, plan: _Plan, support_in, support_y):
    """iMAML's proximal inner loop, first order inside, its result differentiable by the
    implicit gradient (``implicit.ImplicitSolution``)."""
    def proximal_loop(params, x):
        return adapt(task.forward, params, x, support_y, adapted_names=plan.adapted_names,
                     lrs=lrs, steps=plan.steps, first_order=True, inner_loss=plan.inner_loss,
                     loss_scale=plan.loss_scale, proximal=plan.proximal)
    cg_steps, damping = plan.implicit
    problem = ProximalProblem(
        proximal_loop, INNER_LOSSES[plan.inner_loss], task.forward, support_y,
        plan.adapted_names, [n for n in task.params if n not in plan.adapted_names],
        lam=plan.proximal, cg_steps=cg_steps, damping=damping, first_order=plan.first_order,
        last_step=plan.steps - 1)
    params, first_loss, nonfinite = solve_implicit(problem, task.params, support_in)
    return Adaptation(params, first_loss, nonfinite)


def _one_task(model, params, lrs, plan: _Plan, support_x, support_y, query_x, query_y):
    """Adapt to one task and score the query set: (objective, query loss, acc before,
    acc after, first support loss, non-finite flag). The objective is the query loss after
    the last step, or with a multi-step loss the weighted sum over the steps."""
    task = _task_forward(model, params, plan)
    support_in, query_x = task.prepare(support_x), task.prepare(query_x)
    task = _proto_head(model, task, plan, support_in, support_y)
    if plan.acc_before:
        with torch.no_grad(), inner_step(0):
            acc_before = _accuracy(task.forward(task.params, query_x), query_y)
    else:
        acc_before = torch.full((), math.nan, device=query_x.device)
    adaptation = _adapt_task(task, lrs, plan, support_in, support_y)
    # The query forward after step k uses step k's per-step batch-norm set (the reference
    # code's ``num_step``): the last set after the last step.
    with inner_step(plan.steps - 1):
        logits = task.query(adaptation.params, query_x)
    query_loss = cross_entropy(logits, query_y)
    objective = query_loss
    if plan.step_weights is not None:
        # One more query forward per earlier step; the last step's loss is the one above.
        *earlier, last = plan.step_weights
        objective = last * query_loss
        for k, (weight, step_params) in enumerate(zip(earlier, adaptation.steps)):
            with inner_step(k):
                step_logits = task.query(step_params, query_x)
            objective = objective + weight * cross_entropy(step_logits, query_y)
    return (objective, query_loss, acc_before, _accuracy(logits, query_y).detach(),
            adaptation.first_loss, adaptation.nonfinite.float())


def _run_tasks(model, tasks, params, lrs, plan: _Plan, vectorize: bool):
    """Per-task results stacked over tasks: six tensors of shape [T] (``_one_task``'s)."""
    batch = [tasks[k] for k in TASK_KEYS]
    if vectorize:
        # randomness: each task draws its own DropBlock masks (models without random ops
        # are unaffected)
        with batch_norm_for_vmap():
            return torch.func.vmap(lambda *task: _one_task(model, params, lrs, plan, *task),
                                   randomness="different")(*batch)
    per_task = [_one_task(model, params, lrs, plan, *task) for task in zip(*batch)]
    return tuple(torch.stack(column) for column in zip(*per_task))


# Structural copies of a model, one per worker thread: ``functional_call`` swaps the tensors it
# is given into the module while it runs, so two threads must not share a module. The copies'
# own parameters are never used (every call passes all of them), so they are the model's own.
_REPLICAS: "weakref.WeakKeyDictionary[nn.Module, list[nn.Module]]" = weakref.WeakKeyDictionary()


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that holds the model's own parameter tensors, not copies
    of them: a replica for a worker thread then costs the modules, not the weights again."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def _replicas(model: nn.Module, count: int) -> list[nn.Module]:
    copies = _REPLICAS.get(model, [])
    while len(copies) < count:
        copies.append(_structural_copy(model))
    _REPLICAS[model] = copies
    for replica in copies[:count]:
        replica.train(model.training)  # DropBlock's mode follows the model's
    return copies[:count]


@contextlib.contextmanager
def _intra_op_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _map_tasks(fn, n_tasks: int, model: nn.Module, workers: int) -> list:
    """``[fn(i, module) for i in range(n_tasks)]``, in ``workers`` threads of one intra-op
    thread each when ``workers`` > 1. Results come back in task order, so sums over them do
    not depend on the number of workers (nor on which thread ran which task)."""
    results = []
    _each_task_in_order(fn, n_tasks, model, workers, lambda i, result: results.append(result))
    return results


def _each_task_in_order(fn, n_tasks: int, model: nn.Module, workers: int,
                        consume: Callable) -> None:
    """``consume(i, fn(i, module))`` for i = 0, 1, ... in that order, the tasks run in
    ``workers`` threads of one intra-op thread each when ``workers`` > 1. A result is consumed
    as soon as the tasks before it are, and not kept: what a task leaves behind would otherwise
    sit between the next tasks' activations, and a heap allocator could not reuse their space
    (glibc's grew by a task's activations per task; docs/benchmarks/2026-12-05-memory-plan.md)."""
    workers = min(workers, n_tasks)
    if workers <= 1 or any(True for _ in model.buffers()):  # replicas would hold stale buffers
        for i in range(n_tasks):
            consume(i, fn(i, model))
        return
    modules = _replicas(model, workers)
    pending, lock, following = {}, threading.Lock(), [0]

    def deliver(i, result):
        with lock:
            pending[i] = result
            while following[0] in pending:
                consume(following[0], pending.pop(following[0]))
                following[0] += 1

    # Thread k runs tasks k, k + workers, ...: a fixed assignment, so each replica is used by
    # one thread at a time.
    def run_share(k):
        for i in range(k, n_tasks, workers):
            deliver(i, fn(i, modules[k]))
    with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        list(pool.map(run_share, range(workers)))  # list(): re-raises a worker's exception


def _plan(model, spec: InnerLoopSpec, device_type: str, vectorize: bool, *,
          inner_loss_scale=None, acc_before=True, evaluation=False):
    """The batch-wide plan of ``spec`` on ``device_type``, and the step sizes per adapted name.
    ``evaluation`` keeps no outer graph: first order, features reused, no multi-step loss."""
    names = inner_parameter_names(spec.algorithm, model, spec.adapt)
    lrs = resolve_inner_lr(spec.inner_lr, names)
    head_only = splits_body_and_head(model) and all(n.startswith("classifier.") for n in names)
    # Per-step batch norms change the body's output from one inner step to the next: the
    # ANIL fast path's features, computed once, would hold step 0's.
    reuse = (spec.reuse_features or evaluation) and not per_step_parameter_names(model)
    implicit = spec.meta_gradient == "implicit"
    if implicit and per_step_parameter_names(model):
        raise ValueError("meta_gradient='implicit' solves one proximal problem per task: "
                         "per-step batch-norm weights (one set per inner step) do not fit it")
    if spec.proto_head and not splits_body_and_head(model):
        raise ValueError("proto_head initialises the `classifier` head from the `features` "
                         "body's prototypes (the built-in models); this model has no such split")
    plan = _Plan(tuple(names), spec.inner_steps, spec.first_order or evaluation,
                 spec.inner_loss, inner_loss_scale, functional=vectorize,
                 reuse_features=reuse and head_only,
                 autocast=autocast_factory(spec.precision, device_type), acc_before=acc_before,
                 step_weights=None if evaluation else spec.step_weights,
                 checkpoint="none" if evaluation else spec.checkpoint,
                 proximal=spec.proximal_lambda if implicit else None,
                 implicit=(spec.cg_steps, spec.cg_damping) if implicit and not evaluation
                 else None, proto_head=spec.proto_head)
    return plan, lrs


def _detached(lrs):
    """Step sizes (``resolve_inner_lr``'s) without their graph: evaluation learns nothing."""
    if isinstance(lrs, list):
        return [_detached(step) for step in lrs]
    return {n: lr.detach() if isinstance(lr, Tensor) else lr for n, lr in lrs.items()}


def _check_tasks(tasks):
    missing = [k for k in TASK_KEYS if k not in tasks]
    if missing:
        raise KeyError(f"tasks lacks {missing}; expected keys {TASK_KEYS}")


def _summary(objective, query_loss, acc_before, acc_after, first_loss, nonfinite) -> dict:
    """Per-task columns ([T] each) to the means reported by ``meta_loss``, detached, float32."""
    stats = {"acc_before": acc_before.mean(), "acc_after": acc_after.mean(),
             "query_loss": query_loss.mean(), "inner_loss": first_loss.mean(),
             "inner_nonfinite": nonfinite.max()}
    return {k: v.detach().float() for k, v in stats.items()}


def native_batch_norms(model: nn.Module) -> list[str]:
    """Names of ``model``'s torch batch norms (``nn.BatchNorm2d`` ...): under ``vmap`` with
    ``torch.func.grad`` their second-order gradients are wrong (measured in float64 against the
    loop), so such a model takes the loop; ``fsl_dist.models.BatchStatNorm2d`` is exact on
    both paths."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def loop_path_note(spec: InnerLoopSpec, model: nn.Module, device) -> str | None:
    """One line when ``spec`` takes the loop where the device's default is vmap (``vectorize``
    unset, e.g. on CUDA): checkpointing uses saved-tensor hooks or autograd.grad inside an
    autograd.Function, which torch.func transforms refuse; the implicit solve is written for
    the loop. None when nothing changes (on CPU the loop is the default)."""
    if spec.vectorize is not None or not default_vectorize(device, model):
        return None
    if spec.checkpoint != "none":
        what, why = f"algorithm.checkpoint={spec.checkpoint}", "checkpointing cannot cross vmap"
    elif spec.meta_gradient == "implicit":
        what, why = "algorithm.meta_gradient=implicit", "implemented on the loop only"
    else:
        return None
    return (f"note: {what} runs the tasks in a loop, not through {torch.device(device).type}'s "
            f"default vmap ({why}; set algorithm.vectorize=false to silence this)")


def _vectorize(spec: InnerLoopSpec, model: nn.Module, device: torch.device) -> bool:
    if spec.checkpoint != "none" or spec.meta_gradient == "implicit":
        return False  # neither crosses torch.func transforms (the spec refuses True)
    if spec.vectorize and native_batch_norms(model):
        raise ValueError(f"vectorize=True: vmap gives wrong second-order gradients through "
                         f"torch's batch norm ({native_batch_norms(model)[0]}); use "
                         "fsl_dist.models.BatchStatNorm2d in the model, or vectorize=False")
    return default_vectorize(device, model) if spec.vectorize is None else spec.vectorize


def meta_loss(model: nn.Module, tasks: Mapping[str, Tensor], spec: InnerLoopSpec, *,
              inner_loss_scale: float | None = None, acc_before: bool = True):
    """Mean query loss after inner-loop adaptation over a batch of tasks (the meta-objective).

    Args:
        model: any ``nn.Module`` mapping images to logits; which parameters adapt is
            ``spec.algorithm``'s rule on the built-in models' ``features`` and
            ``classifier`` names, or ``spec.adapt``.
        tasks: ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]`` (int64),
            ``query_x [T, Q, C, H, W]``, ``query_y [T, Q]``.
        spec: the inner loop (``InnerLoopSpec``: algorithm, steps, step sizes, order, ...).
        inner_loss_scale: fp16 scale for the support loss this step (see ``InnerLossScaler``).
        acc_before: compute the query accuracy before adaptation (one more forward of the
            query set per task); False reports NaN.

    Returns:
        ``(loss, stats)``: ``loss`` is the mean over tasks of the query cross-entropy after
        adaptation (with ``spec.step_weights``, of its weighted sum over the inner steps),
        differentiable w.r.t. ``model.parameters()`` (and a ``LearnedInnerLR``);
        ``stats`` holds detached 0-dim float32 tensors, means over tasks: ``acc_before`` and
        ``acc_after`` (query accuracy before and after adaptation), ``query_loss`` (after the
        last step),
        ``inner_loss`` (support loss at the first inner step) and ``inner_nonfinite`` (1.0
        if any inner gradient had an inf or NaN; then ``loss`` is not to be stepped on).

    Holds every task's graph until the caller's backward; ``meta_backward`` computes the same
    gradient task by task, faster and in the memory of one task (what the trainer uses).

    Example::

        spec = InnerLoopSpec("maml", inner_steps=1, inner_lr=0.4)
        loss, stats = meta_loss(model, tasks, spec)
        loss.backward()
    """
    _check_tasks(tasks)
    device = tasks["support_x"].device
    vectorize = _vectorize(spec, model, device)
    plan, lrs = _plan(model, spec, device.type, vectorize, inner_loss_scale=inner_loss_scale,
                      acc_before=acc_before)
    params = dict(model.named_parameters())
    results = _run_tasks(model, tasks, params, lrs, plan, vectorize)
    loss = results[0].mean()
    return loss, _summary(*results)


def meta_backward(model: nn.Module, tasks: Mapping[str, Tensor], spec: InnerLoopSpec, *,
                  inner_loss_scale: float | None = None, acc_before: bool = True,
                  loss_scale: float = 1.0, workers: int | None = None,
                  chunk: int | None = None) -> dict:
    """``loss, stats = meta_loss(...); (loss * loss_scale).backward(); return stats``, faster.

    Accumulates the meta-gradient into ``.grad`` of the model's parameters (and of a
    ``LearnedInnerLR``'s) as that backward would, and returns the same ``stats``. The
    arguments are ``meta_loss``'s, plus:

        loss_scale: multiplies the meta-loss before differentiation (fp16 outer scaling).
        workers: loop path only: tasks run in this many threads, each task on one intra-op
            thread; None asks ``default_task_workers`` (CPU: torch's thread count for small
            tasks, 1 for large ones).
        chunk: vmap path only: run the tasks ``chunk`` at a time, one vmap and one backward
            per chunk (less memory; the gradient is the sum of the chunks' parts, equal to the
            whole batch's within float rounding); None: all tasks in one vmap.

    On the loop path each task's graph is differentiated as soon as it is built and then
    freed, so memory holds one task's graph per worker rather than the whole meta-batch; the
    per-task gradients are summed in task order, so the result does not depend on
    ``workers``. On the vmap path this is ``meta_loss`` followed by one backward.
    """
    _check_tasks(tasks)
    device = tasks["support_x"].device
    if _vectorize(spec, model, device):
        if chunk is not None and chunk < tasks["support_x"].shape[0]:
            return _chunked_vmap_backward(model, tasks, spec, chunk, inner_loss_scale,
                                          acc_before, loss_scale)
        loss, stats = meta_loss(model, tasks, spec.replace(vectorize=True),
                                inner_loss_scale=inner_loss_scale, acc_before=acc_before)
        (loss * loss_scale).backward()
        return stats
    plan, _ = _plan(model, spec, device.type, False, inner_loss_scale=inner_loss_scale,
                    acc_before=acc_before)
    leaves = [p for p in model.parameters() if p.requires_grad]
    if isinstance(spec.inner_lr, nn.Module):
        leaves += [p for p in spec.inner_lr.parameters() if p.requires_grad]
    batch = [tasks[k] for k in TASK_KEYS]
    n_tasks = batch[0].shape[0]
    params = dict(model.named_parameters())  # the shared leaves, whichever module runs a task

    def one(i, module):
        # Step sizes resolved per task: a LearnedInnerLR's graph is then not shared between
        # threads (a shared non-leaf would be freed by whichever backward finishes first).
        lrs = resolve_inner_lr(spec.inner_lr, plan.adapted_names)
        results = _one_task(module, params, lrs, plan, *(column[i] for column in batch))
        grads = torch.autograd.grad(results[0] * (loss_scale / n_tasks), leaves,
                                    allow_unused=True)
        return grads, [r.detach() for r in results]

    if workers is None:
        workers = default_task_workers(device, pixels_per_task(tasks))
    # The sums are allocated before the first task's activations, and each task's gradient is
    # added in task order as it arrives: (g0 + g1) + g2 ..., whatever the workers.
    totals = [torch.empty_like(leaf) for leaf in leaves]
    started = [False] * len(leaves)
    per_task_stats = []

    def add(i, result):
        grads, stats = result
        for k, grad in enumerate(grads):
            if grad is not None:
                totals[k].add_(grad) if started[k] else totals[k].copy_(grad)
                started[k] = True
        per_task_stats.append(stats)

    _each_task_in_order(one, n_tasks, model, workers, add)
    for k, leaf in enumerate(leaves):
        total = totals[k] if started[k] else totals[k].zero_()
        leaf.grad = total if leaf.grad is None else leaf.grad + total
    return _summary(*[torch.stack(column) for column in zip(*per_task_stats)])


def _chunked_vmap_backward(model, tasks, spec, chunk, inner_loss_scale, acc_before,
                           loss_scale) -> dict:
    """``meta_backward``'s vmap path, ``chunk`` tasks per vmap: each chunk's part of the mean
    (its sum over tasks / all tasks) is differentiated before the next chunk is built."""
    device = tasks["support_x"].device
    plan, lrs = _plan(model, spec, device.type, True, inner_loss_scale=inner_loss_scale,
                      acc_before=acc_before)
    params = dict(model.named_parameters())
    n_tasks = tasks["support_x"].shape[0]
    columns = []
    for start in range(0, n_tasks, chunk):
        part = {k: v[start:start + chunk] for k, v in tasks.items() if k in TASK_KEYS}
        lrs = resolve_inner_lr(spec.inner_lr, plan.adapted_names)  # a fresh graph per chunk
        results = _run_tasks(model, part, params, lrs, plan, True)
        (results[0].sum() * (loss_scale / n_tasks)).backward()
        columns.append([r.detach() for r in results])
    return _summary(*(torch.cat(column) for column in zip(*columns)))


def evaluate_tasks(model: nn.Module, tasks: Mapping[str, Tensor], spec: InnerLoopSpec, *,
                   inner_loss_scale: float | None = None, workers: int | None = None):
    """Adapt to each task and score its query set, keeping no graph beyond each inner step.

    For meta-validation and meta-test: works under ``torch.no_grad()`` (the inner gradients
    are taken regardless) and its memory does not grow with the number of inner steps; the
    spec's ``first_order`` is moot (there is no outer gradient). On the loop path tasks run in
    ``workers`` threads (as in ``meta_backward``). The model is in evaluation mode meanwhile
    (DropBlock off). Returns the stats of ``meta_loss`` plus ``acc_after_per_task`` (1-D, one
    query accuracy per task, for confidence intervals).
    """
    _check_tasks(tasks)
    with _evaluation_mode(model):
        return _evaluate_tasks(model, tasks, spec, inner_loss_scale, workers)


def _evaluate_tasks(model, tasks, spec, inner_loss_scale, workers) -> dict:
    device = tasks["support_x"].device
    vectorize = _vectorize(spec, model, device)
    plan, lrs = _plan(model, spec, device.type, vectorize, inner_loss_scale=inner_loss_scale,
                      evaluation=True)
    params = {n: p.detach() for n, p in model.named_parameters()}
    lrs = _detached(lrs)
    if vectorize:
        with torch.enable_grad():
            results = _run_tasks(model, tasks, params, lrs, plan, True)
    else:
        batch = [tasks[k] for k in TASK_KEYS]

        def one(i, module):
            with torch.enable_grad():  # grad mode is per thread
                results = _one_task(module, params, lrs, plan, *(column[i] for column in batch))
            return [r.detach() for r in results]

        per_task = _map_tasks(one, batch[0].shape[0], model,
                              default_task_workers(device, pixels_per_task(tasks))
                              if workers is None else workers)
        results = [torch.stack(column) for column in zip(*per_task)]
    results = [r.detach() for r in results]
    return {**_summary(*results), "acc_after_per_task": results[3].float()}


class AdaptedTask:
    """One support set's adapted parameters; ``logits(x)`` scores images with them.

    Made by ``adapt_task``. Batch norm normalises with the statistics of the images scored
    together, as in evaluation, where a task's whole query set is one batch; a model with
    per-step running statistics (MAML++'s BNRS) uses those of the last inner step instead, so
    each image's logits do not depend on the others. Per-step batch-norm weights: the last
    step's set."""

    def __init__(self, model: nn.Module, task: _TaskForward, params: dict, last_step: int = 0):
        self._model, self._task, self._params = model, task, params
        self._last_step = last_step  # per-step batch norms: the set of the last inner step

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Logits ``[B, N]`` (float32) of images ``x [B, C, H, W]``."""
        with _evaluation_mode(self._model), inner_step(self._last_step):
            return upcast(self._task.forward(self._params, self._task.prepare(x))).float()


def adapt_task(model: nn.Module, support_x: Tensor, support_y: Tensor,
               spec: InnerLoopSpec) -> AdaptedTask:
    """Adapt to one support set (``support_x [S, C, H, W]``, labels ``[S]`` in 0..N-1) as
    ``evaluate_tasks`` does for each of its tasks: the spec's algorithm, steps and step sizes,
    evaluation mode, no graph kept. Raises ``FloatingPointError`` when an inner gradient is
    not finite (the adapted weights would be meaningless)."""
    plan, lrs = _plan(model, spec, support_x.device.type, False, evaluation=True,
                      acc_before=False)
    params = {n: p.detach() for n, p in model.named_parameters()}
    lrs = _detached(lrs)
    with _evaluation_mode(model), torch.enable_grad():
        task = _task_forward(model, params, plan)
        support_in = task.prepare(support_x)
        task = _proto_head(model, task, plan, support_in, support_y)
        adaptation = _adapt_task(task, lrs, plan, support_in, support_y)
    if adaptation.nonfinite.item():
        raise FloatingPointError("adapting to the support set gave non-finite inner gradients")
    adapted = {n: p.detach() for n, p in adaptation.params.items()}
    return AdaptedTask(model, task, adapted, plan.steps - 1)


@contextlib.contextmanager
def _evaluation_mode(model: nn.Module):
    was_training = model.training
    model.eval()  # DropBlock (ResNet-12's option) off
    try:
        yield
    finally:
        model.train(was_training)
