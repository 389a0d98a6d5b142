"""Synthetic few-shot tasks, a tiny float64 model, the tests' inner loop, the finite-difference
check of a gradient, and small utilities for the meta-learning tests."""

import torch
import torch.nn.functional as F

from fsl_dist.meta import InnerLoopSpec
from fsl_dist.models import build_model


def make_tasks(tasks=2, n_way=3, k_shot=1, n_query=2, size=8, dtype=torch.float64, seed=0,
               jitter=0.0):
    """Omniglot-like tasks: per class a binary blob prototype; samples are it shifted by up
    to one pixel with a few pixels flipped. Values are exactly 0 or 1, as in Omniglot, unless
    ``jitter`` > 0 blends in that much uniform noise (no exact ties in max-pool windows)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(tasks, n_way, 1, size, size, generator=g)
    protos = (F.avg_pool2d(noise.flatten(0, 1), 3, 1, 1).view_as(noise) > 0.55).to(dtype)

    def draw(per_class):
        y = torch.arange(n_way).repeat(per_class)
        x = protos[:, y].clone()
        for t in range(tasks):
            for i in range(len(y)):
                dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
                x[t, i] = x[t, i].roll((dx, dy), dims=(-2, -1))
        flips = torch.rand(x.shape, generator=g) < 0.03
        x = torch.where(flips, 1 - x, x)
        x = (1 - jitter) * x + jitter * torch.rand(x.shape, generator=g, dtype=dtype)
        return x, y.expand(tasks, -1).contiguous()

    support_x, support_y = draw(k_shot)
    query_x, query_y = draw(n_query)
    return {"support_x": support_x, "support_y": support_y,
            "query_x": query_x, "query_y": query_y}


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


SETTINGS = dict(inner_steps=2, inner_lr={"features": 0.3, "classifier": 0.5})


def spec(algorithm, **options):
    """The tests' inner loop: SETTINGS unless ``options`` say otherwise."""
    return InnerLoopSpec(algorithm, **{**SETTINGS, **options})


def tiny_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", 3, width=4, blocks=2, image_size=8).to(dtype)


def directional_fd(loss_fn, params, direction, eps=1e-6):
    """Central difference of loss_fn along ``direction`` (a list matching ``params``)."""
    def shifted(sign):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        value = loss_fn().item()
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return value
    return (shifted(1) - shifted(-1)) / (2 * eps)


def check_against_finite_differences(loss_fn, params, n_directions=3):
    grads = torch.autograd.grad(loss_fn(), params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(n_directions):
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        norm = flat(direction).norm()
        direction = [d / norm for d in direction]
        analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
        numeric = directional_fd(loss_fn, params, direction)
        assert abs(analytic - numeric) <= 1e-5 * abs(numeric), (analytic, numeric)
