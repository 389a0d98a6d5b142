"""Prototypical networks (Snell, Swersky and Zemel, "Prototypical Networks for Few-shot
Learning", NeurIPS 2017) as a ``Learner``.

Each class's prototype is the mean of its support images' features (the model's ``features``
body, flattened); a query image's logits are the negative squared Euclidean distances to the
prototypes, times ``protonet.scale`` (1 in the paper; ``protonet.learn_scale`` learns it with
the model, a learned temperature). The meta-loss is the query cross-entropy; there is no inner
loop, so the model's head is unused and any N works at evaluation and prediction (the paper
trains Omniglot with 60 classes per episode and tests with 5 or 20: ``eval.n_way``).

Batch norm normalises each task's support set and query set separately, with their own batch
statistics, in training, evaluation and prediction alike (as the MAML family's evaluation
scores a query set), so prediction equals evaluation; tasks never share statistics, so the
meta-gradient does not depend on how tasks are divided among processes.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsl_dist.config import ProtoNetConfig
from fsl_dist.meta.precision import autocast_factory

from .base import Adapted, Learner, nan

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


class Prototypes:
    """A support set's prototypes; ``logits(x)`` scores images against them."""

    def __init__(self, learner: "ProtoNet", protos: Tensor, precision: str):
        self.learner, self.protos, self.precision = learner, protos, precision

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        learner = self.learner
        with learner.evaluation_mode():
            query = learner.features(x, self.precision)
        return proto_logits(query, self.protos, learner.scale_value()).float()


class ProtoNet(Learner):
    section = "protonet"
    fixed_way = False

    def __init__(self, model: nn.Module, options: ProtoNetConfig):
        super().__init__(model, evaluation_steps=0)
        if not isinstance(getattr(model, "features", None), nn.Module):
            raise ValueError("protonet takes the features of the model's `features` body; "
                             f"{type(model).__name__} has none")
        self.options = options
        device = next(model.parameters()).device
        self.scale = LearnedScale(options.scale).to(device) if options.learn_scale else None

    def extras(self) -> dict:
        return {SCALE: self.scale}

    def scale_value(self):
        return self.scale() if self.scale is not None else self.options.scale

    def features(self, x: Tensor, precision: str) -> Tensor:
        with autocast_factory(precision, x.device.type)():
            out = self.model.features(x)
        out = out.flatten(1)
        # distances in float32 at least, as the MAML family's losses (float64 stays float64)
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    def evaluation_mode(self):
        return _mode(self.model, training=False)

    def _task_logits(self, tasks, t: int, precision: str) -> Tensor:
        n_way = int(tasks["support_y"][t].max()) + 1
        support = self.features(tasks["support_x"][t], precision)
        query = self.features(tasks["query_x"][t], precision)
        protos = prototypes(support, tasks["support_y"][t], n_way)
        return proto_logits(query, protos, self.scale_value())

    def meta_backward(self, tasks: Mapping[str, Tensor], *, step: int, precision: str,
                      acc_before: bool = True, loss_scale: float = 1.0,
                      inner_loss_scale: Optional[float] = None) -> dict:
        count = len(tasks["support_x"])
        losses, accs = [], []
        for t in range(count):  # one task's graph at a time
            logits = self._task_logits(tasks, t, precision)
            loss = F.cross_entropy(logits, tasks["query_y"][t])
            (loss * (loss_scale / count)).backward()
            losses.append(loss.detach())
            accs.append((logits.argmax(-1) == tasks["query_y"][t]).float().mean())
        return {"query_loss": torch.stack(losses).mean(), "acc_before": nan(),
                "acc_after": torch.stack(accs).mean(), "inner_loss": nan(),
                "inner_nonfinite": torch.tensor(0.0), "second_order": 0.0,
                "msl_last_weight": 1.0}

    @torch.no_grad()
    def evaluate_tasks(self, tasks: Mapping[str, Tensor], *, precision: str,
                       inner_steps: Optional[int] = None) -> dict:
        accs, losses = [], []
        with self.evaluation_mode():
            for t in range(len(tasks["support_x"])):
                logits = self._task_logits(tasks, t, precision)
                losses.append(F.cross_entropy(logits, tasks["query_y"][t]))
                accs.append((logits.argmax(-1) == tasks["query_y"][t]).float().mean())
        return {"acc_after_per_task": torch.stack(accs), "acc_before": nan(),
                "query_loss": torch.stack(losses).mean()}

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor, *, precision: str) -> Adapted:
        with self.evaluation_mode():
            support = self.features(support_x, precision)
        protos = prototypes(support, support_y, int(support_y.max()) + 1)
        if not torch.isfinite(protos).all():
            raise FloatingPointError("the support set's features are not finite")
        return Prototypes(self, protos, precision)

    def describe(self) -> dict:
        return {"inner_steps": 0, "algorithm": "protonet"}


class _mode:
    """``model.train(training)`` for a block, then back (DropBlock off at evaluation; batch
    norm keeps to batch statistics either way)."""

    def __init__(self, model: nn.Module, training: bool):
        self.model, self.training = model, training

    def __enter__(self):
        self.was = self.model.training
        self.model.train(self.training)

    def __exit__(self, *exc):
        self.model.train(self.was)
