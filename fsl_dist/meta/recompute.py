"""``Recomputed``: a function whose graph is not kept but rebuilt in the backward (the
checkpointing of ``algorithm.checkpoint``)."""

import torch

from ..models.layers import no_batch_stats


class Recomputed(torch.autograd.Function):
    """``run(inputs, create_graph) -> (outputs, aux)`` whose forward keeps only its inputs:
    ``outputs`` (differentiable) and ``aux`` (not) are computed without a graph, and the
    backward recomputes them with one (``create_graph=True``: a function that takes gradients
    inside, such as an inner step, is then differentiated to second order) and differentiates
    that. ``Recomputed.apply(run, given, *inputs)`` returns ``(*outputs, *aux)``; ``given``:
    None, or ``(outputs, random state)`` already computed (by a caller that computes several
    such functions in one pass): the forward then returns them and the backward recomputes
    from that random state.

    Written as a Function rather than with ``torch.utils.checkpoint``: the non-reentrant
    checkpoint runs a function that calls ``autograd.grad`` three times instead of two
    (pytorch issue 102223), and neither works under torch.func transforms
    (docs/2026-12-05-checkpointed-inner-loop.md). The random state is restored for the
    recomputation (DropBlock draws the same masks), and batch statistics are not collected
    twice (MAML++'s BNRS)."""

    @staticmethod
    def forward(ctx, run, given, *inputs):
        ctx.run = run
        ctx.save_for_backward(*inputs)
        if given is not None:
            (outputs, ctx.rng), aux = given, []
        else:
            ctx.rng = rng_state(inputs[-1].device)
            with torch.enable_grad():  # batch statistics are collected from forwards with grad
                outputs, aux = run([t.detach() for t in inputs], False)
        ctx.n_outputs = len(outputs)
        out = [t.detach() for t in outputs] + [t.detach() for t in aux]
        ctx.mark_non_differentiable(*out[ctx.n_outputs:])
        return tuple(out)

    @staticmethod
    def backward(ctx, *grad_out):
        inputs = ctx.saved_tensors
        needed = ctx.needs_input_grad[2:]
        leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needed)]
        with torch.random.fork_rng(rng_devices(inputs[-1].device)), torch.enable_grad(), \
                no_batch_stats():
            set_rng_state(ctx.rng, inputs[-1].device)
            outputs, _ = ctx.run(leaves, True)
            pairs = [(o, g) for o, g in zip(outputs, grad_out) if o.requires_grad]
            wanted = [t for t, need in zip(leaves, needed) if need]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted,
                                             [g for _, g in pairs], allow_unused=True))
        return (None, None, *(next(grads) if need else None for need in needed))


def rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
