"""The inner loop: adapted = params - lr * grad(support loss), for a number of steps."""

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.layers import inner_step

Params = dict[str, Tensor]
Forward = Callable[[Mapping[str, Tensor], Tensor], Tensor]


def upcast(t: Tensor) -> Tensor:
    """Half-precision tensors to float32 (losses and updates stay in float32); float32 and
    float64 tensors as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(upcast(logits), y)


def mse_one_hot(logits: Tensor, y: Tensor) -> Tensor:
    """MSE between logits and one-hot labels (the original project's inner loss)."""
    # Comparison against arange rather than F.one_hot: it batches under vmap.
    one_hot = (y.unsqueeze(-1) == torch.arange(logits.shape[-1], device=y.device))
    logits = upcast(logits)
    return F.mse_loss(logits, one_hot.to(logits.dtype))


INNER_LOSSES = {"ce": cross_entropy, "mse": mse_one_hot}


class Adaptation(NamedTuple):
    """Result of ``adapt``."""

    params: Params     # every parameter, the adapted ones replaced by their adapted values
    first_loss: Tensor  # support loss before the first update (detached, unscaled)
    nonfinite: Tensor   # bool: some inner gradient held an inf or NaN
    # with keep_steps: every parameter after each inner step (the last is ``params``)
    steps: tuple = ()


def adapt(forward: Forward, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *,
          adapted_names, lrs: Mapping, steps: int, first_order: bool = False,
          inner_loss: str = "ce", loss_scale: float | None = None,
          functional: bool = False, keep_steps: bool = False) -> Adaptation:
    """Adapt ``params`` to one task's support set ``(x, y)`` with ``steps`` gradient steps.

    Args:
        forward: ``forward(params, x) -> logits``.
        params: every parameter ``forward`` needs, by name.
        adapted_names: the names that adapt; the others stay fixed (but stay in the graph, so
            they are still meta-learned through the adapted ones).
        lrs: ``{name: step size}`` for every adapted name (floats or tensors), or a sequence
            of them, step k taking entry k (the last one for steps beyond it).
        steps: number of inner steps (at least one).
        first_order: if True the inner gradients are detached, so the meta-gradient treats
            adaptation as the identity (first-order MAML); otherwise it flows through them.
        inner_loss: "ce" (cross-entropy) or "mse" (MSE on one-hot labels).
        loss_scale: multiplies the support loss before differentiation, divided out of the
            gradient in float32 afterwards (fp16 underflow protection).
        functional: take gradients with ``torch.func.grad`` (required under ``vmap``) instead
            of ``torch.autograd.grad``.
        keep_steps: also return the parameters after every step (``Adaptation.steps``, for
            MAML++'s multi-step loss).

    A non-finite gradient is not raised on (one rank raising would hang the others): it is
    reported in ``nonfinite`` and left in the result for the caller to skip the step.
    """
    if steps < 1:
        raise ValueError(f"inner steps must be at least 1, got {steps}")
    loss_fn = INNER_LOSSES[inner_loss]
    adapted = {n: params[n] for n in adapted_names}
    fixed = {n: p for n, p in params.items() if n not in adapted}

    def support_loss(current):
        loss = loss_fn(forward({**fixed, **current}, x), y)
        scaled = loss * loss_scale if loss_scale is not None else loss
        return scaled, loss.detach()

    gradient = _functional_gradient if functional else _autograd_gradient
    first_loss, nonfinite = None, torch.zeros((), dtype=torch.bool, device=x.device)
    kept = []
    per_step = lrs if isinstance(lrs, Sequence) else [lrs]
    for k in range(steps):
        step_lrs = per_step[min(k, len(per_step) - 1)]
        with inner_step(k):  # per-step batch norms use set k (MAML++'s BNWB)
            grads, loss = gradient(support_loss, adapted, create_graph=not first_order)
        if loss_scale is not None:
            grads = {n: g / loss_scale for n, g in grads.items()}
        if first_loss is None:
            first_loss = loss
        nonfinite = nonfinite | _any_nonfinite(grads)
        adapted = {n: p - step_lrs[n] * grads[n] for n, p in adapted.items()}
        if keep_steps:
            kept.append({**params, **adapted})
    return Adaptation({**params, **adapted}, first_loss, nonfinite, tuple(kept))


def _autograd_gradient(loss_fn, params: Params, create_graph: bool):
    # Evaluation passes detached parameters: make them leaves so there is something to
    # differentiate; parameters already in a graph keep their history.
    params = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in params.items()}
    scaled, loss = loss_fn(params)
    grads = torch.autograd.grad(scaled, list(params.values()), create_graph=create_graph)
    return dict(zip(params, grads)), loss


def _functional_gradient(loss_fn, params: Params, create_graph: bool):
    grads, loss = torch.func.grad(loss_fn, has_aux=True)(params)
    if not create_graph:
        grads = {n: g.detach() for n, g in grads.items()}
    return grads, loss


def _any_nonfinite(grads: Mapping[str, Tensor]) -> Tensor:
    return torch.stack([~torch.isfinite(g).all() for g in grads.values()]).any()
