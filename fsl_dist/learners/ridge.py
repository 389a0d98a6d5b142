"""The closed-form ridge-regression head (R2D2: Bertinetto, Henriques, Torr and Vedaldi, "Meta-
learning with differentiable closed-form solvers", ICLR 2019; MetaOptNet's ridge head, Lee et
al. 2019) as a ``Learner``.

For a task, the head regresses one-hot labels ``Y [S, N]`` on the support features ``X [S, D]``
(the model's ``features`` body, flattened) in closed form, in the Woodbury form whose system has
the size of the support set rather than of the features:

    W = X^T (X X^T + lambda I)^-1 Y          ([D, N]; equal to (X^T X + lambda I)^-1 X^T Y)

and a query's logits are ``scale * (x W)``. The solve is differentiable, so the query
cross-entropy trains the body through it. ``ridge.learn_scale`` learns the scale (R2D2's alpha;
its beta, a shift common to every class's logit, leaves the softmax unchanged and so gets no
gradient: left out), ``ridge.learn_lambda`` the penalty (the R2D2 paper learns it, its
released scripts keep it fixed; MetaOptNet fixes 50).
Training, evaluation and prediction are ``FeatureHeadLearner``'s (features.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fsl_dist.config import RidgeConfig

from .features import FeatureHeadLearner

RIDGE = "ridge"  # the learned values' name in checkpoints and model files


class RidgeParameters(nn.Module):
    """The learned values of the head: log scale and/or log lambda (logarithms keep them
    positive)."""

    def __init__(self, options: RidgeConfig):
        super().__init__()
        if options.learn_scale:
            self.log_scale = nn.Parameter(torch.tensor(math.log(options.scale)))
        if options.learn_lambda:
            self.log_lam = nn.Parameter(torch.tensor(math.log(options.lam)))


def ridge_weights(support: Tensor, labels: Tensor, n_way: int, lam) -> Tensor:
    """``X^T (X X^T + lam I)^-1 Y``: the ridge solution ``[D, N]`` by the Woodbury form."""
    targets = torch.nn.functional.one_hot(labels, n_way).to(support.dtype)
    gram = support @ support.T
    eye = torch.eye(len(support), dtype=support.dtype, device=support.device)
    return support.T @ torch.linalg.solve(gram + lam * eye, targets)


class RidgeHead(FeatureHeadLearner):
    section = "ridge"

    def __init__(self, model: nn.Module, options: RidgeConfig):
        super().__init__(model)
        self.options = options
        learned = options.learn_scale or options.learn_lambda
        device = next(model.parameters()).device
        self.learned = RidgeParameters(options).to(device) if learned else None

    def extras(self) -> dict:
        return {RIDGE: self.learned}

    def _value(self, name: str, default: float):
        learned = getattr(self.learned, name, None) if self.learned is not None else None
        return learned.exp() if learned is not None else default

    def fit(self, support: Tensor, labels: Tensor, n_way: int) -> Tensor:
        return ridge_weights(support, labels, n_way, self._value("log_lam", self.options.lam))

    def score(self, head: Tensor, query: Tensor) -> Tensor:
        return self._value("log_scale", self.options.scale) * (query @ head)
