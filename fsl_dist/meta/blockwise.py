"""A second-order inner gradient taken block by block, in the memory of one block's graph.

``torch.autograd.grad(loss, params, create_graph=True)`` keeps, until the outer backward, the
graph of the whole support forward and of its backward: every activation of every block and
every gradient between them. Checkpointing the blocks does not help there, because the graph
of the inner gradient holds the recomputed activations. Here the backbone is a sequence of
blocks ``x[b+1] = f_b(params_b, x[b])`` followed by a head, and the inner gradient is
written out as the chain of block vector-Jacobian products

    g[B] = d loss / d x[B];   (g[b], grad params_b) = vjp of f_b at (params_b, x[b]) with g[b+1]

with each ``f_b`` and each block's vjp a ``Recomputed`` function whose values come from one
ordinary forward and backward of the support set (no graph kept). Only the block boundaries
``x[b]`` and ``g[b]`` are kept. The outer backward recomputes one block at a time: its
forward and first backward, differentiated once more (second order). The inner gradient is
autograd's, bitwise; the second-order terms are added up block by block, so the
meta-gradient equals the default's to rounding (tests/test_meta_checkpoint.py).
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ..models.layers import current_inner_step, inner_step
from .recompute import Recomputed, rng_state


class Blocks(NamedTuple):
    """A forward ``head(body(params, x))`` split into the body's blocks."""

    blocks: tuple  # ((f(params_b, x) -> x, names of params_b), ...), in forward order
    head: Callable  # head(params, features) -> logits
    head_names: tuple  # names of the head's parameters


def blockwise_gradient(blocks: Blocks, params: Mapping[str, Tensor], adapted_names, x: Tensor,
                       y: Tensor, loss_fn, loss_scale: float | None):
    """Second-order ``(grads of the (scaled) support loss w.r.t. adapted_names, loss)``, as
    ``torch.autograd.grad(..., create_graph=True)`` would give them."""
    adapted = set(adapted_names)
    # The vjp chain goes back only as far as the first block with adapted parameters.
    firsts = [b for b, (_, names) in enumerate(blocks.blocks) if adapted & set(names)]
    first = firsts[0] if firsts else len(blocks.blocks)
    values = _values(blocks, params, adapted_names, x, y, loss_fn, loss_scale, first)
    k = current_inner_step()
    xs = [x]
    for b, (fn, names) in enumerate(blocks.blocks):
        given = ([values.xs[b + 1]], values.rngs[b])
        xs.append(Recomputed.apply(_apply(fn, names, k), given, *_block(params, names),
                                   xs[-1])[0])
    head_adapted = [n for n in blocks.head_names if n in adapted]
    head_params = {n: params[n] for n in blocks.head_names}
    loss = loss_fn(blocks.head(head_params, xs[-1]), y)
    scaled = loss * loss_scale if loss_scale is not None else loss
    wanted = [xs[-1]] + [head_params[n] for n in head_adapted]
    g, *head_grads = torch.autograd.grad(scaled, wanted, create_graph=True)
    grads = dict(zip(head_adapted, head_grads))
    for b in reversed(range(first, len(blocks.blocks))):
        fn, names = blocks.blocks[b]
        own = [n for n in names if n in adapted]
        with_input = b > first
        given = (([values.gs[b]] if with_input else []) + [values.grads[n] for n in own],
                 values.rngs[b])
        out = Recomputed.apply(_vjp(fn, names, own, k, with_input), given,
                               *_block(params, names), xs[b], g)
        g = out[0] if with_input else None
        grads.update(zip(own, out[int(with_input):]))
    return {n: grads[n] for n in adapted_names}, loss.detach()


class _Values(NamedTuple):
    xs: list      # block boundaries x[0..B]
    gs: dict      # b -> d loss / d x[b], for the boundaries the vjp chain passes
    grads: dict   # adapted name -> d loss / d param
    rngs: list    # the random state before each block's forward


def _values(blocks, params, adapted_names, x, y, loss_fn, loss_scale, first) -> _Values:
    """Every value of the chain from one ordinary forward and backward (no graph kept): what
    the ``Recomputed`` functions return, without running each block's forward twice."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    xs, rngs = [x.detach()], []
    with torch.enable_grad():
        for fn, names in blocks.blocks:
            rngs.append(rng_state(x.device))
            xs.append(fn({n: leaves[n] for n in names}, xs[-1]))
        head = {n: leaves[n] for n in blocks.head_names}
        loss = loss_fn(blocks.head(head, xs[-1]), y)
        scaled = loss * loss_scale if loss_scale is not None else loss
        boundaries = list(range(first + 1, len(blocks.blocks)))
        names = [n for fn_names in (b[1] for b in blocks.blocks[first:]) for n in fn_names
                 if n in set(adapted_names)]
        wanted = [xs[b] for b in boundaries] + [leaves[n] for n in names]
        out = torch.autograd.grad(scaled, wanted) if wanted else ()  # ANIL: head alone
    return _Values([t.detach() for t in xs], dict(zip(boundaries, out)),
                   dict(zip(names, out[len(boundaries):])), rngs)


def _block(params, names):
    return [params[n] for n in names]


def _apply(fn, names, k):
    """``run`` of ``Recomputed`` for ``fn(params_b, x)`` in inner step ``k``."""
    def run(tensors, create_graph):
        with inner_step(k):
            return [fn(dict(zip(names, tensors[:-1])), tensors[-1])], []
    return run


def _vjp(fn, names, own, k, with_input: bool):
    """``run`` of ``Recomputed`` for the vjp of ``fn`` at ``(params_b, x)`` with cotangent
    ``g``: ``(g_x if with_input, grads of own)``."""
    def run(tensors, create_graph):
        *values, x, g = tensors
        block = dict(zip(names, values))
        with torch.enable_grad(), inner_step(k):
            if with_input and not x.requires_grad:
                x = x.detach().requires_grad_()
            for n in own:
                if not block[n].requires_grad:
                    block[n] = block[n].detach().requires_grad_()
            out = fn(block, x)
            wanted = ([x] if with_input else []) + [block[n] for n in own]
            return list(torch.autograd.grad(out, wanted, g, create_graph=create_graph)), []
    return run
