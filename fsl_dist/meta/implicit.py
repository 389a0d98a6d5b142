"""Implicit meta-gradients (iMAML, Rajeswaran et al. 2019).

The inner problem is proximal: phi* = argmin_phi L_s(phi) + (lambda/2) ||phi - theta||^2,
approached by first-order gradient steps (no graph kept through them: memory does not grow
with the number of steps). At its minimum grad L_s(phi*) + lambda (phi* - theta) = 0, so by
the implicit function theorem d phi*/d theta = (I + H/lambda)^-1, H the Hessian of the support
loss L_s (without the proximal term) at phi*. The meta-gradient of a query loss with gradient
g at phi* is then v solving

    ((1 + damping) I + H / lambda) v = g,

by ``cg_steps`` steps of conjugate gradients on Hessian-vector products (double backward);
``damping`` (default 0) is added to the identity as written, which keeps the system positive
definite where H has negative curvature (the support loss is not convex in a network's
weights).

Parameters that do not adapt (BOIL's head, ANIL's body, per name ``adapt``) and the support
inputs (ANIL's body features) enter L_s too: phi* depends on them through the same condition,
d phi*/d w = -(H + lambda I)^-1 d^2 L_s / d phi d w, whose product with g is
-(1/lambda) d/dw (v . grad_phi L_s), one more double backward with the v already solved. That
term is included (exact at a minimum, as the adapted block's formula is), added to the direct
gradient of the query loss that every parameter gets.
"""

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..models.layers import inner_step


def conjugate_gradient(matvec: Callable[[list[Tensor]], list[Tensor]], b: Sequence[Tensor],
                       steps: int) -> list[Tensor]:
    """``steps`` iterations of conjugate gradients on ``A x = b`` from x = 0, ``A`` symmetric
    positive definite given as ``matvec`` on lists of tensors (the blocks of one vector).
    Stops early when the residual vanishes."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in r]
    rs = _dot(r, r)
    for _ in range(steps):
        if rs.item() == 0:  # solved exactly (b = 0 included): alpha would be 0/0
            break
        ap = matvec(p)
        alpha = rs / _dot(p, ap)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rs_new = _dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


class ImplicitSolution(torch.autograd.Function):
    """``phi*(theta, others)`` whose backward is the implicit-function-theorem gradient.

    ``apply(problem, n, *inputs)``: the first ``n`` inputs are the anchors theta (the adapted
    parameters' meta-values), the rest the other inputs of the support loss (fixed parameters,
    the support input last). ``problem.solve(inputs)`` returns ``(phi, aux)`` computed without
    a graph; ``problem.support_loss(phi, others)`` is L_s; ``problem.lam``, ``cg_steps``,
    ``damping``, ``first_order`` (v = g: the proximal inner loop's first-order gradient).
    Returns ``(*phi, *aux)``, aux not differentiable."""

    @staticmethod
    def forward(ctx, problem, n, *inputs):
        with torch.enable_grad():  # the inner gradients are taken whatever the caller's mode
            phi, aux = problem.solve([t.detach() for t in inputs])
        phi = [t.detach() for t in phi]
        aux = [t.detach() for t in aux]
        ctx.problem, ctx.n = problem, n
        ctx.save_for_backward(*phi, *inputs[n:])
        ctx.mark_non_differentiable(*aux)
        return (*phi, *aux)

    @staticmethod
    def backward(ctx, *grad_out):
        problem, n = ctx.problem, ctx.n
        saved = ctx.saved_tensors
        g = [torch.zeros_like(p) if go is None else go for p, go in zip(saved[:n], grad_out)]
        others_needed = ctx.needs_input_grad[2 + n:]
        if problem.first_order:
            return (None, None, *g, *(None for _ in others_needed))
        with torch.enable_grad():
            phi = [t.detach().requires_grad_() for t in saved[:n]]
            others = [t.detach().requires_grad_(need) for t, need in
                      zip(saved[n:], others_needed)]
            grads = torch.autograd.grad(problem.support_loss(phi, others), phi,
                                        create_graph=True)

            def matvec(v):
                hv = torch.autograd.grad(grads, phi, v, retain_graph=True)
                return [(1 + problem.damping) * vi + hvi / problem.lam
                        for vi, hvi in zip(v, hv)]
            v = conjugate_gradient(matvec, [t.detach() for t in g], problem.cg_steps)
            wanted = [t for t, need in zip(others, others_needed) if need]
            mixed = iter(torch.autograd.grad(grads, wanted, v, allow_unused=True)
                         if wanted else ())
        rest = []
        for t, need in zip(others, others_needed):
            m = next(mixed) if need else None
            rest.append(None if m is None else -m / problem.lam)
        return (None, None, *v, *rest)


class ProximalProblem:
    """One task's proximal inner problem for ``ImplicitSolution``."""

    def __init__(self, adapt_fn, loss_fn, forward, y, names, fixed_names, *, lam: float,
                 cg_steps: int, damping: float, first_order: bool, last_step: int):
        self.adapt_fn, self.loss_fn, self.forward, self.y = adapt_fn, loss_fn, forward, y
        self.names, self.fixed_names = list(names), list(fixed_names)
        self.lam, self.cg_steps, self.damping = lam, cg_steps, damping
        self.first_order, self.last_step = first_order, last_step

    def solve(self, inputs):
        n, k = len(self.names), len(self.fixed_names)
        params = {**dict(zip(self.names, inputs[:n])),
                  **dict(zip(self.fixed_names, inputs[n:n + k]))}
        adaptation = self.adapt_fn(params, inputs[-1])
        return ([adaptation.params[name] for name in self.names],
                [adaptation.first_loss, adaptation.nonfinite])

    def support_loss(self, phi, others):
        params = {**dict(zip(self.names, phi)), **dict(zip(self.fixed_names, others[:-1]))}
        with inner_step(self.last_step):
            return self.loss_fn(self.forward(params, others[-1]), self.y)


def solve_implicit(problem: ProximalProblem, params: Mapping[str, Tensor], x: Tensor):
    """``(every parameter with the adapted ones at phi*, first support loss, non-finite)``,
    differentiable with respect to ``params`` and ``x`` by the implicit gradient."""
    inputs = ([params[n] for n in problem.names] + [params[n] for n in problem.fixed_names]
              + [x])
    out = ImplicitSolution.apply(problem, len(problem.names), *inputs)
    phi = dict(zip(problem.names, out[:len(problem.names)]))
    return {**params, **phi}, out[-2], out[-1]
