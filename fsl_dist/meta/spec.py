"""The inner loop's definition: one frozen value, built from a config in one place and passed
as one argument to ``meta_loss``, ``meta_backward`` and ``evaluate_tasks``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .algorithms import ALGORITHMS, LearnedInnerLR, check_adapt_rule
from .inner import INNER_LOSSES
from .precision import PRECISIONS

# InnerLoopSpec.checkpoint's levels, the lightest first.
CHECKPOINT_LEVELS = ("none", "steps", "blocks")
# InnerLoopSpec.meta_gradient's choices.
META_GRADIENTS = ("unrolled", "implicit")

if TYPE_CHECKING:
    from fsl_dist.config import Config


@dataclass(frozen=True)
class InnerLoopSpec:
    """What the inner loop does for every task of a batch.

    Attributes:
        algorithm: "maml", "boil" or "anil" (which parameters adapt: every one, those under
            ``features``, those under ``classifier``).
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
        step_weights: MAML++'s multi-step loss: one weight per inner step, the meta-objective
            being the weighted sum of the query losses after each step (``msl_weights``);
            None: the query loss after the last step alone. Evaluation ignores it.
        adapt: which parameters adapt, replacing the algorithm's rule (for models of your own,
            whose parameters are not named ``features.*`` and ``classifier.*``): a name prefix
            ("encoder" takes ``encoder.*``), a tuple of them, or a predicate ``name -> bool``.
            None (default): the algorithm's rule. ``algorithm`` still names the method in logs.
        checkpoint: trade compute for memory in the outer backward, the meta-gradient
            unchanged: "none"; "steps" keeps only the parameters at each inner step's start
            and recomputes the step (forward and inner gradient) in the outer backward;
            "blocks" takes each second-order inner gradient block by block of the backbone,
            keeping only the blocks' boundaries (``blockwise``), and checkpoints the blocks
            of the passes outside the inner loop (query sets; ANIL's body features). A
            first-order step keeps no graph to checkpoint. The loop path only (``vectorize``
            True is refused).
        meta_gradient: "unrolled" (default): differentiate through the inner steps (second
            order unless ``first_order``). "implicit": iMAML (``fsl_dist.meta.implicit``): the
            inner loop minimises the support loss plus (proximal_lambda/2) ||phi - theta||^2
            with first-order steps (no graph kept: memory independent of ``inner_steps``), and
            the meta-gradient of the adapted parameters is v solving
            ((1 + cg_damping) I + H / proximal_lambda) v = g (g the query gradient at phi, H
            the support loss's Hessian there) by ``cg_steps`` conjugate-gradient steps; the
            other parameters get their direct query gradient plus their exact implicit term.
            ``first_order`` takes v = g. Evaluation adapts with the same proximal inner loop.
            The loop path only; not with ``checkpoint``, ``step_weights`` or a
            ``LearnedInnerLR`` (phi* does not depend on the step sizes).
        proximal_lambda: iMAML's lambda (positive): the proximal term's weight (implicit only).
        cg_steps: conjugate-gradient steps of the implicit solve (at least 1).
        cg_damping: added to the system's identity (not negative); 0 solves it as written.
        proto_head: Proto-MAML (Triantafillou et al. 2020): each task's head starts from the
            prototypes of its support set (W_k = 2 c_k, b_k = -||c_k||^2, c_k the class means
            of the body's features) instead of the trained head, then the inner loop runs;
            the meta-gradient includes the path through the prototypes. Built-in models
            (a ``features`` body and a linear ``classifier``); not with ``implicit``.

    Example::

        spec = InnerLoopSpec("maml", inner_steps=1, inner_lr=0.4)
        loss, stats = meta_loss(model, tasks, spec)
        # any nn.Module: BOIL's rule on a model whose head is `fc` (the body adapts)
        spec = InnerLoopSpec("boil", 1, 0.5, adapt=lambda name: not name.startswith("fc."))
    """

    algorithm: str
    inner_steps: int
    inner_lr: Any
    first_order: bool = False
    inner_loss: str = "ce"
    precision: str = "no"
    vectorize: Optional[bool] = None
    reuse_features: bool = True
    step_weights: Optional[tuple[float, ...]] = None
    adapt: Any = None
    checkpoint: str = "none"
    meta_gradient: str = "unrolled"
    proximal_lambda: float = 1.0
    cg_steps: int = 5
    cg_damping: float = 0.0
    proto_head: bool = False

    def __post_init__(self):
        for field, value, allowed in (("algorithm", self.algorithm, ALGORITHMS),
                                      ("inner_loss", self.inner_loss, tuple(INNER_LOSSES)),
                                      ("precision", self.precision, PRECISIONS),
                                      ("checkpoint", self.checkpoint, CHECKPOINT_LEVELS),
                                      ("meta_gradient", self.meta_gradient, META_GRADIENTS)):
            if value not in allowed:
                raise ValueError(f"InnerLoopSpec.{field} must be one of {allowed}, got {value!r}")
        check_adapt_rule(self.adapt)
        if self.checkpoint != "none" and self.vectorize:
            raise ValueError("InnerLoopSpec.checkpoint runs on the loop path (checkpointing "
                             "cannot cross torch.func.vmap): vectorize must be False or None")
        if self.meta_gradient == "implicit":
            self._check_implicit()
        if self.step_weights is not None and len(self.step_weights) != self.inner_steps:
            raise ValueError(f"InnerLoopSpec.step_weights needs one weight per inner step "
                             f"({self.inner_steps}), got {len(self.step_weights)}")

    def _check_implicit(self):
        if not self.proximal_lambda > 0:
            raise ValueError(f"InnerLoopSpec.proximal_lambda must be positive, got "
                             f"{self.proximal_lambda!r}")
        if self.cg_steps < 1 or not self.cg_damping >= 0:
            raise ValueError(f"InnerLoopSpec: implicit needs cg_steps >= 1 and cg_damping >= 0, "
                             f"got {self.cg_steps!r} and {self.cg_damping!r}")
        clashes = [name for name, on in (
            ("vectorize=True", self.vectorize), ("checkpoint", self.checkpoint != "none"),
            ("step_weights", self.step_weights is not None), ("proto_head", self.proto_head),
            ("a LearnedInnerLR", isinstance(self.inner_lr, LearnedInnerLR))) if on]
        if clashes:
            raise ValueError(f"InnerLoopSpec.meta_gradient='implicit' does not take "
                             f"{clashes[0]} (the loop path; no graph through the inner steps)")

    def replace(self, **changes) -> "InnerLoopSpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, cfg: "Config", *, precision: str, inner_lr=None,
                    evaluation: bool = False, inner_steps: Optional[int] = None,
                    step: Optional[int] = None):
        """The spec of ``cfg``'s algorithm section.

        ``inner_lr`` overrides the configured step sizes (the trainer passes its
        ``LearnedInnerLR``); ``evaluation`` takes ``eval.inner_steps`` when it is set;
        ``inner_steps`` overrides both. ``step``, the number of finished training steps, sets
        what is scheduled by step (the multi-step loss weights, first order before
        ``algorithm.first_order_steps``): the spec is a pure function
        of it, so a resumed run continues the schedules exactly. Without it (evaluation, other
        callers) nothing scheduled is on.
        """
        eval_steps = cfg.evaluation_inner_steps()
        return cls.from_algorithm(cfg.algorithm, precision=precision, inner_lr=inner_lr,
                                  inner_steps=inner_steps if inner_steps is not None else
                                  eval_steps if evaluation else None, step=step,
                                  evaluation=evaluation)

    @classmethod
    def from_algorithm(cls, algo, *, precision: str, inner_lr=None,
                       inner_steps: Optional[int] = None, step: Optional[int] = None,
                       evaluation: bool = False):
        """``from_config`` of an algorithm section alone (``AlgorithmConfig``): ``inner_steps``
        defaults to the training ones."""
        if inner_steps is None:
            inner_steps = algo.inner_steps
        training = step is not None and not evaluation
        annealing = training and step < algo.first_order_steps  # derivative-order annealing
        return cls(algorithm=algo.name, inner_steps=inner_steps,
                   inner_lr=algo.inner_lr if inner_lr is None else inner_lr,
                   first_order=algo.first_order or annealing, inner_loss=algo.inner_loss,
                   precision=precision, vectorize=algo.vectorize,
                   step_weights=msl_weights(inner_steps, step, algo.msl_steps)
                   if training else None,
                   adapt=tuple(algo.adapt) if algo.adapt else None, checkpoint=algo.checkpoint,
                   meta_gradient=algo.meta_gradient, proximal_lambda=algo.proximal_lambda,
                   cg_steps=algo.cg_steps, cg_damping=algo.cg_damping,
                   proto_head=algo.proto_head)


# The reference code's floor of a non-final weight, as a fraction of the uniform weight 1/S.
MSL_FLOOR = 0.03


def msl_weights(inner_steps: int, step: int, msl_steps: int) -> Optional[tuple[float, ...]]:
    """MAML++'s multi-step loss weights at training ``step``, or None once ``step`` reaches
    ``msl_steps`` (and always when ``msl_steps`` is 0): then the last step's loss alone.

    The schedule of the reference code (AntreasAntoniou/HowToTrainYourMAMLPytorch,
    ``get_per_step_loss_importance_vector``) with its epochs replaced by training steps: with
    S inner steps the weights start at 1/S each; every training step the non-final ones fall
    by 1/S/msl_steps, down to 0.03/S, and the last one rises by (S-1) times that, up to
    1 - (S-1)*0.03/S, so that they always sum to 1 (both bounds are reached at 97% of
    ``msl_steps``). The reference computes them once per epoch (piecewise constant over its
    500 iterations); here they move every step. As there, the multi-step loss stops after
    ``msl_steps`` (the reference's ``epoch < multi_step_loss_num_epochs``).
    """
    if step >= msl_steps:
        return None
    s = inner_steps
    decay = step / s / msl_steps
    floor = MSL_FLOOR / s
    early = max(1.0 / s - decay, floor)
    last = min(1.0 / s + (s - 1) * decay, 1.0 - (s - 1) * floor)
    return (early,) * (s - 1) + (last,)
