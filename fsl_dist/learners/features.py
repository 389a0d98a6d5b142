"""Families that fit a head to a support set's features in closed form, with no inner gradient
steps (ProtoNet's prototypes, the ridge head): the shared training, evaluation and prediction.

Batch norm normalises each task's support set and query set separately, with their own batch
statistics, in training, evaluation and prediction alike (as the MAML family's evaluation
scores a query set), so prediction equals evaluation; tasks never share statistics, so the
meta-gradient does not depend on how tasks are divided among processes.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsl_dist.data.augment import shift_offsets, shifted
from fsl_dist.meta.precision import autocast_factory

from .base import Adapted, Learner, nan


class FittedHead:
    """A support set's fitted head (``FeatureHeadLearner.fit``); ``logits(x)`` scores images."""

    def __init__(self, learner: "FeatureHeadLearner", head, precision: str):
        self.learner, self.head, self.precision = learner, head, precision

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        learner = self.learner
        with learner.evaluation_mode():
            query = learner.test_features(x, self.precision)
        return learner.score(self.head, query).float()


class FeatureHeadLearner(Learner):
    """A family that fits a head to the support set's features in closed form (no inner
    gradient steps) and scores the query features with it: ProtoNet, the ridge head. The
    model's ``features`` body is the embedding; its own head is unused, so any N works.

    ``test_shift`` (``eval.test_shift``): at evaluation and prediction an image's features are
    the mean of its shifted copies' (``shift_offsets``), each copy its own forward, so that
    batch norm sees each copy as the set it is; training is unchanged."""

    fixed_way = False
    test_shift = 0

    def __init__(self, model: nn.Module):
        super().__init__(model, evaluation_steps=0)
        if not isinstance(getattr(model, "features", None), nn.Module):
            raise ValueError("the family takes the features of the model's `features` body; "
                             f"{type(model).__name__} has none")

    def fit(self, support: Tensor, labels: Tensor, n_way: int):
        """The head of support features ``[S, D]`` with labels ``[S]`` in 0..N-1."""
        raise NotImplementedError

    def score(self, head, query: Tensor) -> Tensor:
        """Logits ``[Q, N]`` of query features ``[Q, D]``."""
        raise NotImplementedError

    def features(self, x: Tensor, precision: str) -> Tensor:
        with autocast_factory(precision, x.device.type)():
            out = self.model.features(x)
        out = out.flatten(1)
        # losses in float32 at least, as the MAML family's (float64 stays float64)
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    def test_features(self, x: Tensor, precision: str) -> Tensor:
        """``features`` at evaluation and prediction: with ``test_shift``, averaged over the
        shifted copies of ``x``."""
        if not self.test_shift:
            return self.features(x, precision)
        views = [self.features(shifted(x, dy, dx), precision)
                 for dy, dx in shift_offsets(self.test_shift)]
        return torch.stack(views).mean(0)

    def evaluation_mode(self):
        return _mode(self.model, training=False)

    def _task_logits(self, tasks, t: int, precision: str, embed=None) -> Tensor:
        embed = embed or self.features
        n_way = int(tasks["support_y"][t].max()) + 1
        support = embed(tasks["support_x"][t], precision)
        query = embed(tasks["query_x"][t], precision)
        return self.score(self.fit(support, tasks["support_y"][t], n_way), query)

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
                logits = self._task_logits(tasks, t, precision, self.test_features)
                losses.append(F.cross_entropy(logits, tasks["query_y"][t]))
                accs.append((logits.argmax(-1) == tasks["query_y"][t]).float().mean())
        return {"acc_after_per_task": torch.stack(accs), "acc_before": nan(),
                "query_loss": torch.stack(losses).mean()}

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor, *, precision: str) -> Adapted:
        with self.evaluation_mode():
            support = self.test_features(support_x, precision)
        head = self.fit(support, support_y, int(support_y.max()) + 1)
        if not all(torch.isfinite(h).all() for h in _tensors_of(head)):
            raise FloatingPointError("the head fitted to the support set is not finite")
        return FittedHead(self, head, precision)


def _tensors_of(head) -> list:
    return list(head) if isinstance(head, tuple) else [head]


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
