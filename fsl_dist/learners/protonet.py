"""Prototypical networks (Snell, Swersky and Zemel, "Prototypical Networks for Few-shot
Learning", NeurIPS 2017) as a ``Learner``.

Each class's prototype is the mean of its support images' features (the model's ``features``
body, flattened); a query image's logits are the negative squared Euclidean distances to the
prototypes, times ``protonet.scale`` (1 in the paper; ``protonet.learn_scale`` learns it with
the model, a learned temperature). The meta-loss is the query cross-entropy; there is no inner
loop, so the model's head is unused and any N works at evaluation and prediction (the paper
trains Omniglot with 60 classes per episode and tests with 5 or 20: ``eval.n_way``).

Training, evaluation and prediction are ``FeatureHeadLearner``'s (fsl_dist/learners/features.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fsl_dist.config import ProtoNetConfig

from .features import FeatureHeadLearner

SCALE = "scale"  # the learned scale's name in checkpoints and model files


class LearnedScale(nn.Module):
    """The distance scale as a trained parameter, stored as its logarithm (stays positive)."""

    def __init__(self, scale: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self) -> Tensor:
        return self.log_scale.exp()


def prototypes(features: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class means ``[N, D]`` of ``features [S, D]`` with labels ``[S]`` in 0..N-1."""
    sums = torch.zeros(n_way, features.shape[1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, labels, features)
    counts = torch.bincount(labels, minlength=n_way).to(features.dtype)
    return sums / counts.unsqueeze(1)


def proto_logits(query: Tensor, protos: Tensor, scale) -> Tensor:
    """``-scale * ||query_i - proto_k||^2``, ``[Q, N]``."""
    return -scale * (query.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)


class ProtoNet(FeatureHeadLearner):
    section = "protonet"

    def __init__(self, model: nn.Module, options: ProtoNetConfig):
        super().__init__(model)
        self.options = options
        device = next(model.parameters()).device
        self.scale = LearnedScale(options.scale).to(device) if options.learn_scale else None

    def extras(self) -> dict:
        return {SCALE: self.scale}

    def scale_value(self):
        return self.scale() if self.scale is not None else self.options.scale

    def fit(self, support: Tensor, labels: Tensor, n_way: int) -> Tensor:
        return prototypes(support, labels, n_way)

    def score(self, head: Tensor, query: Tensor) -> Tensor:
        return proto_logits(query, head, self.scale_value())
