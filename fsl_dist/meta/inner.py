"""The inner loop: adapted = params - lr * grad(support loss), for a number of steps."""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.layers import inner_step
from .blockwise import Blocks, blockwise_gradient
from .recompute import Recomputed

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
          functional: bool = False, keep_steps: bool = False,
          checkpoint: bool = False, blocks: Blocks | None = None,
          proximal: float | None = None) -> Adaptation:
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
        checkpoint: second order only (first order keeps no graph of a step anyway): keep
            just each step's inputs (the parameters at its start) and recompute the step's
            forward and inner gradient during the outer backward (``Recomputed``); the
            same meta-gradient in the memory of one step's graph. Not under ``functional``.
        blocks: ``forward`` split into its blocks (``blockwise.Blocks``): second-order inner
            gradients are then taken block by block, keeping only the blocks' boundaries
            (``blockwise_gradient``). Not under ``functional``.
        proximal: iMAML's lambda: the inner objective becomes the support loss plus
            (lambda/2) ||adapted - start||^2, the start being the adapted parameters' values
            on entry (taken as constants); its gradient lambda (adapted - start) is added to
            each step's. None: no proximal term.

    A non-finite gradient is not raised on (one rank raising would hang the others): it is
    reported in ``nonfinite`` and left in the result for the caller to skip the step.
    """
    if steps < 1:
        raise ValueError(f"inner steps must be at least 1, got {steps}")
    loss_fn = INNER_LOSSES[inner_loss]
    adapted = {n: params[n] for n in adapted_names}
    anchor = None if proximal is None else (proximal, {n: p.detach() for n, p in adapted.items()})
    fixed = {n: p for n, p in params.items() if n not in adapted}

    if (checkpoint or blocks is not None) and functional:
        raise ValueError("a checkpointed inner loop cannot run under torch.func transforms "
                         "(vmap): use the loop path")
    gradient = _functional_gradient if functional else _autograd_gradient
    first_loss, nonfinite = None, torch.zeros((), dtype=torch.bool, device=x.device)
    kept = []
    per_step = lrs if isinstance(lrs, Sequence) else [lrs]
    for k in range(steps):
        step_lrs = per_step[min(k, len(per_step) - 1)]
        step = functools.partial(_step, k, forward, y, loss_fn, loss_scale, gradient, blocks,
                                 anchor)
        if checkpoint and not first_order:
            adapted, loss, step_nonfinite = _recomputed(step, adapted, fixed, step_lrs, x)
        else:
            adapted, loss, step_nonfinite = step(adapted, fixed, step_lrs, x, not first_order)
        if first_loss is None:
            first_loss = loss
        nonfinite = nonfinite | step_nonfinite
        if keep_steps:
            kept.append({**params, **adapted})
    return Adaptation({**params, **adapted}, first_loss, nonfinite, tuple(kept))


def _step(k, forward, y, loss_fn, loss_scale, gradient, blocks, anchor, adapted, fixed, lrs,
          x, create_graph):
    """Inner step ``k``: ``(adapted - lrs * grad, support loss, non-finite flag)``; with
    ``anchor`` = (lambda, start) the proximal term's gradient lambda (adapted - start) is
    added to grad."""
    def support_loss(current):
        loss = loss_fn(forward({**fixed, **current}, x), y)
        scaled = loss * loss_scale if loss_scale is not None else loss
        return scaled, loss.detach()

    with inner_step(k):  # per-step batch norms use set k (MAML++'s BNWB)
        if blocks is not None and create_graph:
            grads, loss = blockwise_gradient(blocks, {**fixed, **adapted}, list(adapted), x, y,
                                             loss_fn, loss_scale)
        else:
            grads, loss = gradient(support_loss, adapted, create_graph=create_graph)
    if loss_scale is not None:
        grads = {n: g / loss_scale for n, g in grads.items()}
    if anchor is not None:
        lam, start = anchor
        grads = {n: g + lam * (adapted[n] - start[n]) for n, g in grads.items()}
    updated = {n: p - lrs[n] * grads[n] for n, p in adapted.items()}
    return updated, loss, _any_nonfinite(grads)


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


def _recomputed(step, adapted: Params, fixed: Params, lrs: Mapping, x: Tensor):
    """``step(adapted, fixed, lrs, x, create_graph=True)`` without keeping its graph: the
    values now, the step recomputed in the outer backward (``Recomputed``)."""
    groups = [dict(adapted), dict(fixed), {n: v for n, v in lrs.items()
                                           if isinstance(v, Tensor)}]
    floats = {n: v for n, v in lrs.items() if not isinstance(v, Tensor)}
    names = [list(g) for g in groups]
    flat_in = [t for g in groups for t in g.values()] + [x]

    def run(tensors, create_graph):
        parts, start = [], 0
        for group in names:
            parts.append(dict(zip(group, tensors[start:start + len(group)])))
            start += len(group)
        updated, loss, nonfinite = step(parts[0], parts[1], {**floats, **parts[2]},
                                        tensors[-1], create_graph)
        return list(updated.values()), [loss, nonfinite]

    out = Recomputed.apply(run, None, *flat_in)
    return dict(zip(names[0], out[:len(adapted)])), out[-2], out[-1]


def _any_nonfinite(grads: Mapping[str, Tensor]) -> Tensor:
    return torch.stack([~torch.isfinite(g).all() for g in grads.values()]).any()
