"""Synthetic few-shot tasks and small utilities for the meta-learning tests."""

import torch
import torch.nn.functional as F


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
