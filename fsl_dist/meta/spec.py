"""The inner loop's definition: one frozen value, built from a config in one place and passed
as one argument to ``meta_loss``, ``meta_backward`` and ``evaluate_tasks``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .algorithms import ALGORITHMS
from .inner import INNER_LOSSES
from .precision import PRECISIONS

if TYPE_CHECKING:
    from fsl_dist.config import Config


@dataclass(frozen=True)
class InnerLoopSpec:
    """What the inner loop does for every task of a batch.

    Attributes:
        algorithm: "maml", "boil" or "anil" (which parameters adapt).
        inner_steps: inner gradient steps per task (at least one).
        inner_lr: a float, ``{"features": a, "classifier": b}`` or a ``LearnedInnerLR``.
        first_order: drop the second-order term (the meta-gradient treats adaptation as the
            identity). Second order is the default.
        inner_loss: "ce" or "mse" (MSE on one-hot labels); the query loss is always CE.
        precision: "no", "bf16" or "fp16" autocast over inner and outer forwards; the inner
            update, batch-norm statistics and losses stay in float32.
        vectorize: tasks through ``torch.func.vmap`` (True) or a loop (False); None asks
            ``default_vectorize`` for the tensors' device.
        reuse_features: ANIL fast path, computing body features once per task when only the
            head adapts (same result; False only to measure the difference).

    Example::

        spec = InnerLoopSpec("maml", inner_steps=1, inner_lr=0.4)
        loss, stats = meta_loss(model, tasks, spec)
    """

    algorithm: str
    inner_steps: int
    inner_lr: Any
    first_order: bool = False
    inner_loss: str = "ce"
    precision: str = "no"
    vectorize: Optional[bool] = None
    reuse_features: bool = True

    def __post_init__(self):
        for field, value, allowed in (("algorithm", self.algorithm, ALGORITHMS),
                                      ("inner_loss", self.inner_loss, tuple(INNER_LOSSES)),
                                      ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"InnerLoopSpec.{field} must be one of {allowed}, got {value!r}")

    def replace(self, **changes) -> "InnerLoopSpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, cfg: "Config", *, precision: str, inner_lr=None,
                    evaluation: bool = False, inner_steps: Optional[int] = None):
        """The spec of ``cfg``'s algorithm section.

        ``inner_lr`` overrides the configured step sizes (the trainer passes its
        ``LearnedInnerLR``); ``evaluation`` takes ``eval.inner_steps`` when it is set;
        ``inner_steps`` overrides both.
        """
        algo = cfg.algorithm
        if inner_steps is None:
            inner_steps = algo.inner_steps
            if evaluation and cfg.eval.inner_steps is not None:
                inner_steps = cfg.eval.inner_steps
        return cls(algorithm=algo.name, inner_steps=inner_steps,
                   inner_lr=algo.inner_lr if inner_lr is None else inner_lr,
                   first_order=algo.first_order, inner_loss=algo.inner_loss,
                   precision=precision, vectorize=algo.vectorize)
