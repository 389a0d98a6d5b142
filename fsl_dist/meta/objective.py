"""The meta-objective over a batch of tasks, vectorised with ``vmap`` or in a loop."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..models.layers import batch_norm_for_vmap
from .algorithms import adapted_parameter_names, resolve_inner_lr
from .inner import adapt, cross_entropy, upcast
from .precision import autocast_factory

TASK_KEYS = ("support_x", "support_y", "query_x", "query_y")


def default_vectorize(device, model: nn.Module | None = None) -> bool:
    """Whether ``meta_loss`` runs tasks through ``vmap`` (True) or a loop (False) by default.

    The one place holding the measured choice per device type (BENCHMARKS.md). ``model`` is
    accepted so that a backbone-specific choice can be added where a measurement calls for it.
    """
    device_type = torch.device(device).type
    if device_type == "cuda":
        # Measured on an NVIDIA H100 (torch 2.11, BENCHMARKS.md): vmap 3.6-5.8x the loop's
        # tasks/s for every model, algorithm and step count at meta-batch 8 (launch/bench.py),
        # and 12.6x in launch/train.py at meta-batch 32 (795 vs 63 tasks/s), for ~1.2x memory.
        return True
    # CPU, measured on the 2-core development machine with native batch norm in the loop: the
    # loop won 10 of 12 cases (Conv-4 1.6-2.5x, ResNet 1.2-1.5x), tied ResNet MAML at
    # 5 steps and lost ResNet BOIL at 5 steps by 9%, at about half the memory. Other devices:
    # unmeasured, take the path that needs no batching rules.
    return False


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


def _strip(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}


def _body_fn(model: nn.Module, autocast):
    """``body(params, x)``: features under autocast, returned in float32 (or float64)."""
    def body(params, x):
        with autocast():
            return upcast(functional_call(model.features, _strip(params, "features."), (x,)))
    return body


def _head_fn(model: nn.Module):
    """``head(params, features)`` in the parameters' precision, outside autocast: the head is
    cheap, and under autocast its weights are rounded to bf16/fp16 at every inner step, which
    rounds away inner updates smaller than 1/256 of a weight (measured: 5-step ANIL meta-
    gradient relative error 1.8 with the head in bf16)."""
    def head(params, features):
        return functional_call(model.classifier, _strip(params, "classifier."), (features,))
    return head


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean()


def _one_task(model, params, lrs, plan: _Plan, support_x, support_y, query_x, query_y):
    """Adapt to one task and score the query set: (query loss, acc before, acc after,
    first support loss, non-finite flag)."""
    if plan.reuse_features:
        # ANIL fast path: the body does not adapt, so its features are computed once per
        # task (support and query separately, as in the full forward, since batch norm uses
        # each batch's statistics) and the inner loop runs on the head alone.
        body = _body_fn(model, plan.autocast)
        support_x, query_x = body(params, support_x), body(params, query_x)
        params = {n: p for n, p in params.items() if n.startswith("classifier.")}
        forward = _head_fn(model)
    else:
        body, head = _body_fn(model, plan.autocast), _head_fn(model)
        forward = lambda params, x: head(params, body(params, x))  # noqa: E731
    with torch.no_grad():
        acc_before = _accuracy(forward(params, query_x), query_y)
    adaptation = adapt(forward, params, support_x, support_y, adapted_names=plan.adapted_names,
                       lrs=lrs, steps=plan.steps, first_order=plan.first_order,
                       inner_loss=plan.inner_loss, loss_scale=plan.loss_scale,
                       functional=plan.functional)
    logits = forward(adaptation.params, query_x)
    return (cross_entropy(logits, query_y), acc_before, _accuracy(logits, query_y).detach(),
            adaptation.first_loss, adaptation.nonfinite.float())


def _run_tasks(model, tasks, params, lrs, plan: _Plan, vectorize: bool):
    """Per-task results stacked over tasks: five tensors of shape [T]."""
    batch = [tasks[k] for k in TASK_KEYS]
    if vectorize:
        with batch_norm_for_vmap():
            return torch.func.vmap(lambda *task: _one_task(model, params, lrs, plan, *task))(*batch)
    per_task = [_one_task(model, params, lrs, plan, *task) for task in zip(*batch)]
    return tuple(torch.stack(column) for column in zip(*per_task))


def _plan(model, algorithm, inner_steps, inner_lr, first_order, inner_loss, precision,
          inner_loss_scale, vectorize, reuse_features, device_type):
    names = adapted_parameter_names(algorithm, [n for n, _ in model.named_parameters()])
    lrs = resolve_inner_lr(inner_lr, names)
    head_only = all(n.startswith("classifier.") for n in names)
    plan = _Plan(tuple(names), inner_steps, first_order, inner_loss, inner_loss_scale,
                 functional=vectorize, reuse_features=reuse_features and head_only,
                 autocast=autocast_factory(precision, device_type))
    return plan, lrs


def _check_tasks(tasks):
    missing = [k for k in TASK_KEYS if k not in tasks]
    if missing:
        raise KeyError(f"tasks lacks {missing}; expected keys {TASK_KEYS}")


def meta_loss(model: nn.Module, tasks: Mapping[str, Tensor], *, algorithm: str,
              inner_steps: int, inner_lr, first_order: bool = False,
              vectorize: bool | None = None, inner_loss: str = "ce", precision: str = "no",
              inner_loss_scale: float | None = None, reuse_features: bool = True):
    """Mean query loss after inner-loop adaptation over a batch of tasks (the meta-objective).

    Args:
        model: a model with ``features`` and ``classifier`` (see ``fsl_dist.models``).
        tasks: ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]`` (int64),
            ``query_x [T, Q, C, H, W]``, ``query_y [T, Q]``.
        algorithm: "maml", "boil" or "anil" (which parameters adapt).
        inner_steps: inner gradient steps per task (at least one).
        inner_lr: a float, ``{"features": a, "classifier": b}`` or a ``LearnedInnerLR``.
        first_order: drop the second-order term (the meta-gradient treats adaptation as the
            identity). Second order is the default.
        vectorize: tasks through ``torch.func.vmap`` (True) or a loop (False); None asks
            ``default_vectorize`` for the tensors' device.
        inner_loss: "ce" or "mse" (MSE on one-hot labels); the query loss is always CE.
        precision: "no", "bf16" or "fp16" autocast over inner and outer forwards; the inner
            update, batch-norm statistics and losses stay in float32.
        inner_loss_scale: fp16 scale for the support loss (see ``InnerLossScaler``).
        reuse_features: ANIL fast path, computing body features once per task when only
            the head adapts (same result; False only to measure the difference).

    Returns:
        ``(loss, stats)``: ``loss`` is the mean over tasks of the query cross-entropy after
        adaptation, differentiable w.r.t. ``model.parameters()`` (and a ``LearnedInnerLR``);
        ``stats`` holds detached 0-dim float32 tensors, means over tasks: ``acc_before`` and
        ``acc_after`` (query accuracy before and after adaptation), ``query_loss``,
        ``inner_loss`` (support loss at the first inner step) and ``inner_nonfinite`` (1.0
        if any inner gradient had an inf or NaN; then ``loss`` is not to be stepped on).

    Example::

        loss, stats = meta_loss(model, tasks, algorithm="maml", inner_steps=1, inner_lr=0.4)
        loss.backward()
    """
    _check_tasks(tasks)
    device = tasks["support_x"].device
    if vectorize is None:
        vectorize = default_vectorize(device, model)
    plan, lrs = _plan(model, algorithm, inner_steps, inner_lr, first_order, inner_loss,
                      precision, inner_loss_scale, vectorize, reuse_features, device.type)
    params = dict(model.named_parameters())
    query_loss, acc_before, acc_after, first_loss, nonfinite = _run_tasks(
        model, tasks, params, lrs, plan, vectorize)
    loss = query_loss.mean()
    stats = {"acc_before": acc_before.mean(), "acc_after": acc_after.mean(),
             "query_loss": loss.detach(), "inner_loss": first_loss.mean(),
             "inner_nonfinite": nonfinite.max()}
    return loss, {k: v.detach().float() for k, v in stats.items()}


def evaluate_tasks(model: nn.Module, tasks: Mapping[str, Tensor], *, algorithm: str,
                   inner_steps: int, inner_lr, inner_loss: str = "ce", precision: str = "no",
                   inner_loss_scale: float | None = None, vectorize: bool | None = None):
    """Adapt to each task and score its query set, keeping no graph beyond each inner step.

    For meta-validation and meta-test: works under ``torch.no_grad()`` (the inner gradients
    are taken regardless) and its memory does not grow with the number of inner steps.
    Returns the stats of ``meta_loss`` plus ``acc_after_per_task`` (1-D, one query accuracy
    per task, for confidence intervals).
    """
    _check_tasks(tasks)
    device = tasks["support_x"].device
    if vectorize is None:
        vectorize = default_vectorize(device, model)
    plan, lrs = _plan(model, algorithm, inner_steps, inner_lr, True, inner_loss, precision,
                      inner_loss_scale, vectorize, True, device.type)
    params = {n: p.detach() for n, p in model.named_parameters()}
    lrs = {n: lr.detach() if isinstance(lr, Tensor) else lr for n, lr in lrs.items()}
    with torch.enable_grad():
        results = _run_tasks(model, tasks, params, lrs, plan, vectorize)
    query_loss, acc_before, acc_after, first_loss, nonfinite = (r.detach() for r in results)
    return {"acc_before": acc_before.mean(), "acc_after": acc_after.mean(),
            "query_loss": query_loss.mean(), "inner_loss": first_loss.mean(),
            "inner_nonfinite": nonfinite.max(), "acc_after_per_task": acc_after.float()}
