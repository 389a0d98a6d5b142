"""The MAML family as a ``Learner``: MAML, BOIL and ANIL (which parameters adapt), with MAML++'s
options, checkpoint levels and iMAML's implicit meta-gradient, all from the ``algorithm``
section; the inner loop and the meta-gradient are ``fsl_dist.meta``'s."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from fsl_dist.config import AlgorithmConfig, ConfigError
from fsl_dist.memory_plan import Plan, apply_to_spec, plan_arguments
from fsl_dist.meta import (
    InnerLoopSpec,
    LearnedInnerLR,
    adapt_task,
    evaluate_tasks,
    learned_inner_lr,
    meta_backward,
)
from fsl_dist.meta.objective import loop_path_note

from .base import Adapted, Learner

INNER_LR = "inner_lr"  # the learned step sizes' name in checkpoints and model files


class MamlFamily(Learner):
    """MAML, BOIL and ANIL; ``inner_lr``: the configured step sizes, or the
    ``LearnedInnerLR`` that ``algorithm.learn_inner_lr`` asks for (None: built from
    ``algorithm``)."""

    def __init__(self, model: nn.Module, algorithm: AlgorithmConfig, evaluation_steps: int,
                 inner_lr=None):
        super().__init__(model, evaluation_steps)
        self.algorithm = algorithm
        if inner_lr is None:
            inner_lr = algorithm.inner_lr
            if algorithm.learn_inner_lr:
                inner_lr = learned_inner_lr(model, algorithm.name, algorithm.inner_lr,
                                            algorithm.learn_inner_lr, algorithm.inner_steps,
                                            adapt=algorithm.adapt)
                inner_lr = inner_lr.to(next(model.parameters()).device)
        self.inner_lr = inner_lr
        self.plan: Optional[Plan] = None  # train.memory_budget_gb's choice (None: defaults)

    def extras(self) -> dict:
        learned = self.inner_lr if isinstance(self.inner_lr, LearnedInnerLR) else None
        return {INNER_LR: learned}

    def load_extras(self, states: Mapping[str, Optional[dict]]) -> None:
        saved = states.get(INNER_LR)
        if saved is None:
            return  # fixed step sizes saved; learned ones start from the configured values
        # per tensor ("lrs.*") or per step ("per_step", [inner steps, tensors])
        kind = "per_step" if "per_step" in saved else "true"
        advice = f"the checkpoint has learned inner step sizes: set algorithm.learn_inner_lr={kind}"
        if kind == "per_step":
            advice += " and the algorithm.inner_steps it was trained with"
        if not isinstance(self.inner_lr, LearnedInnerLR):
            raise ConfigError(advice)
        try:
            self.inner_lr.load_state_dict(saved)
        except RuntimeError as error:
            raise ConfigError(f"{advice} ({str(error).splitlines()[0]})") from error

    def spec(self, *, precision: str, step: Optional[int] = None, evaluation: bool = False,
             inner_steps: Optional[int] = None) -> InnerLoopSpec:
        """The inner loop of training ``step`` or, with ``evaluation``, of evaluation."""
        if evaluation and inner_steps is None:
            inner_steps = self.evaluation_steps
        spec = InnerLoopSpec.from_algorithm(self.algorithm, precision=precision,
                                            inner_lr=self.inner_lr, inner_steps=inner_steps,
                                            step=step, evaluation=evaluation)
        return spec if evaluation else apply_to_spec(spec, self.plan)

    def notes(self, device: torch.device, *, precision: str) -> list[str]:
        note = loop_path_note(self.spec(precision=precision), self.model, device)
        return [note] if note else []

    def meta_backward(self, tasks: Mapping[str, Tensor], *, step: int, precision: str,
                      acc_before: bool = True, loss_scale: float = 1.0,
                      inner_loss_scale: Optional[float] = None) -> dict:
        # The step enters here: what MAML++ schedules by step is a function of it alone.
        spec = self.spec(precision=precision, step=step)
        stats = meta_backward(self.model, tasks, spec, acc_before=acc_before,
                              loss_scale=loss_scale, inner_loss_scale=inner_loss_scale,
                              **plan_arguments(self.plan))
        return {**stats, "second_order": float(not spec.first_order),
                "msl_last_weight": spec.step_weights[-1] if spec.step_weights else 1.0}

    def evaluate_tasks(self, tasks: Mapping[str, Tensor], *, precision: str,
                       inner_steps: Optional[int] = None) -> dict:
        spec = self.spec(precision=precision, evaluation=True, inner_steps=inner_steps)
        return evaluate_tasks(self.model, tasks, spec)

    def adapt(self, support_x: Tensor, support_y: Tensor, *, precision: str) -> Adapted:
        return adapt_task(self.model, support_x, support_y,
                          self.spec(precision=precision, evaluation=True).replace(
                              vectorize=False))
