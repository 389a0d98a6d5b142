"""A second-order inner gradient taken block by block, in the memory of one block's graph.

``torch.autograd.grad(loss, params, create_graph=True)`` keeps, until the outer backward, the
graph of the whole support forward and of its backward: every activation of every block and
every gradient between them. Checkpointing the blocks does not help there, because the graph
of the inner gradient holds the recomputed activations. Here the backbone is a sequence of
blocks ``x[b+1] = f_b(params_b, x[b])`` followed by a head, and the inner gradient is
written out as the chain of block vector-Jacobian products

    g[B] = d loss / d x[B];   (g[b], grad params_b) = vjp of f_b at (params_b, x[b]) with g[b+1]

with each ``f_b`` and each block's vjp a ``Recomputed`` function. Only the block boundaries
``x[b]`` and ``g[b]`` are kept. The outer backward recomputes one block at a time: its
forward and first backward, differentiated once more (second order). The result is the same
gradient as autograd's, whose backward computes the same products in the same order.
"""

import contextlib
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ..models.layers import current_inner_step, inner_step, no_batch_stats
from .recompute import Recomputed, rng_devices, rng_state, set_rng_state


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
    xs, replays = [x], []
    for fn, names in blocks.blocks:
        out, replay = _apply(fn, names, params, xs[-1])
        xs.append(out)
        replays.append(replay)
    head_adapted = [n for n in blocks.head_names if n in adapted]
    features = xs[-1]
    head_params = {n: params[n] for n in blocks.head_names}
    loss = loss_fn(blocks.head(head_params, features), y)
    scaled = loss * loss_scale if loss_scale is not None else loss
    wanted = [features] + [head_params[n] for n in head_adapted]
    g, *head_grads = torch.autograd.grad(scaled, wanted, create_graph=True)
    grads = dict(zip(head_adapted, head_grads))
    # The vjp chain goes back only as far as the first block with adapted parameters.
    firsts = [b for b, (_, names) in enumerate(blocks.blocks) if adapted & set(names)]
    for b in reversed(range(firsts[0] if firsts else len(blocks.blocks), len(blocks.blocks))):
        fn, names = blocks.blocks[b]
        own = [n for n in names if n in adapted]
        g, block_grads = _vjp(fn, names, own, params, xs[b], g, replays[b],
                              with_input=b > firsts[0])
        grads.update(zip(own, block_grads))
    return {n: grads[n] for n in adapted_names}, loss.detach()


def _apply(fn, names, params, x):
    """``fn(params_b, x)``, recomputed in the backward, and how to replay it (``_replay``)."""
    replay = (current_inner_step(), rng_state(x.device), x.device)

    def run(tensors, create_graph):
        with inner_step(replay[0]):  # Recomputed restores the random state itself
            return [fn(dict(zip(names, tensors[:-1])), tensors[-1])], []
    return Recomputed.apply(run, *(params[n] for n in names), x)[0], replay


def _vjp(fn, names, own, params, x, g, replay, with_input: bool):
    """``(g_x, grads of own)``: the vjp of ``fn`` at ``(params_b, x)`` with cotangent ``g``
    (``g_x`` None unless ``with_input``), recomputed, and differentiated, in the backward."""
    def run(tensors, create_graph):
        *values, x, g = tensors
        block = dict(zip(names, values))
        with torch.enable_grad(), _replay(*replay):
            if with_input and not x.requires_grad:
                x = x.detach().requires_grad_()
            for n in own:
                if not block[n].requires_grad:
                    block[n] = block[n].detach().requires_grad_()
            out = fn(block, x)
            wanted = ([x] if with_input else []) + [block[n] for n in own]
            return list(torch.autograd.grad(out, wanted, g, create_graph=create_graph)), []

    out = Recomputed.apply(run, *(params[n] for n in names), x, g)
    return (out[0] if with_input else None), out[int(with_input):]


@contextlib.contextmanager
def _replay(k: int, rng, device):
    """The conditions of block b's forward in inner step ``k``: its per-step batch-norm set and
    the random state it started from (DropBlock's masks; the global stream is left as it
    was); batch statistics are not collected again."""
    with inner_step(k), torch.random.fork_rng(rng_devices(device)), no_batch_stats():
        set_rng_state(rng, device)
        yield
