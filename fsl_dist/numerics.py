"""Gradients as one flat vector, and how far one such vector is from another.

Shared by the trainer (one all-reduce over the flat gradient), launch/bench.py (methods
against fsl_dist's loop path and float64) and launch/precision_check.py (float32 and bf16
against float64).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


def flat_grads(params: Iterable[Tensor]) -> Tensor:
    """The ``.grad`` of each parameter, in order, flattened into one vector (zeros where a
    parameter has no gradient, so that positions line up across models and methods)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                      for p in params])


def set_flat_grads(params: Iterable[Tensor], flat: Tensor) -> None:
    """Give each parameter, in order, its slice of the flat vector ``flat`` as ``.grad``
    (``flat_grads``' inverse)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def gradient_of(backward: Callable[[], None], params: Iterable[Tensor]) -> Tensor:
    """The gradient that ``backward()`` accumulates into ``params`` from none, flattened."""
    params = list(params)
    for p in params:
        p.grad = None
    backward()
    return flat_grads(params)


def agreement(grad: Tensor, reference: Tensor) -> dict:
    """``grad`` against ``reference``, in float64: ``max_rel_diff`` (largest element difference
    over the largest reference element), ``norm_rel_diff`` (difference norm over reference norm)
    and ``cosine`` (cosine similarity)."""
    grad, reference = grad.double(), reference.double()
    diff = grad - reference
    return {"max_rel_diff": (diff.abs().max() / reference.abs().max()).item(),
            "norm_rel_diff": (diff.norm() / reference.norm()).item(),
            "cosine": F.cosine_similarity(grad, reference, dim=0).item()}
