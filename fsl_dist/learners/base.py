"""What the trainer, evaluation and prediction ask of a family of few-shot learners.

A family is one ``Learner`` subclass in one module of this package, registered in
``fsl_dist.learners.LEARNERS`` under the ``algorithm.name`` values it answers; its own config
keys, if any, are one section of the config named by ``section`` (model.yaml records it). The
trainer owns distribution: it calls ``meta_backward`` on this process's tasks, all-reduces the
flat gradient of ``parameters()`` with the returned statistics in one collective, and takes the
same optimizer step on every process, whatever the family.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Mapping, Optional, Protocol

import torch
from torch import Tensor, nn

from fsl_dist.config import ConfigError

# The statistics ``meta_backward`` returns as tensors (means over this process's tasks), in the
# order the trainer all-reduces them; a family without one of them returns NaN.
STAT_KEYS = ("query_loss", "acc_before", "acc_after", "inner_loss", "inner_nonfinite")


class Adapted(Protocol):
    """A learner adapted to one support set."""

    def logits(self, x: Tensor) -> Tensor:
        """Logits ``[B, N]`` (float32) of images ``x [B, C, H, W]``, columns in label order."""


class Learner(abc.ABC):
    """One family of few-shot learners, bound to its model.

    Attributes:
        model: the network (its parameters are trained by every family).
        evaluation_steps: inner steps at evaluation (0 for a family without an inner loop);
            recorded in evaluation results.
        fixed_way: True when the model's head fixes N (the MAML family): tasks at evaluation
            and prediction must have the trained N; False when any N works (ProtoNet).
        section: the family's own config section (None: none), recorded in model.yaml.
    """

    section: ClassVar[Optional[str]] = None
    fixed_way: ClassVar[bool] = True

    def __init__(self, model: nn.Module, evaluation_steps: int):
        self.model, self.evaluation_steps = model, evaluation_steps

    # -------------------------------------------------------- learned state
    def extras(self) -> dict[str, Optional[nn.Module]]:
        """Learned state besides the model, name -> module (None: not learned in this run):
        optimised with the model, checkpointed under its name, exported under "<name>."."""
        return {}

    def parameters(self) -> list[Tensor]:
        """What the optimizer steps, in the order of the all-reduced flat gradient."""
        params = list(self.model.parameters())
        for module in self.extras().values():
            if module is not None:
                params += list(module.parameters())
        return params

    def load_extras(self, states: Mapping[str, Optional[dict]]) -> None:
        """Load ``extras()``' state from a checkpoint or a model file (name -> state dict or
        None); a mismatch is a ConfigError naming the setting."""
        for name, module in self.extras().items():
            state = states.get(name)
            if (state is None) != (module is None):
                raise ConfigError(f"the saved `{name}` is {'absent' if state is None else 'there'}"
                                  f" but this run's config {'learns' if module else 'fixes'} it")
            if module is not None:
                try:
                    module.load_state_dict(state)
                except RuntimeError as error:
                    raise ConfigError(f"the saved `{name}` does not fit the configured one "
                                      f"({str(error).splitlines()[0]})") from error

    def notes(self, device: torch.device, *, precision: str) -> list[str]:
        """Lines the trainer prints before training about how this family will run on
        ``device`` (a path other than the device's default, ...); none by default."""
        return []

    # -------------------------------------------------------- training
    @abc.abstractmethod
    def meta_backward(self, tasks: Mapping[str, Tensor], *, step: int, precision: str,
                      acc_before: bool = True, loss_scale: float = 1.0,
                      inner_loss_scale: Optional[float] = None) -> dict:
        """Add ``loss_scale`` times the gradient of the mean meta-loss of ``tasks`` (support_x
        ``[T, S, C, H, W]``, support_y, query_x, query_y) to the ``.grad`` of ``parameters()``.

        ``step`` is the number of finished training steps (what a family schedules by step is
        a pure function of it, so a resumed run continues exactly). Returns ``STAT_KEYS`` as
        0-dim tensors (means over the tasks), plus floats the trainer logs as they are:
        ``second_order`` and ``msl_last_weight``."""

    # -------------------------------------------------------- evaluation and prediction
    @abc.abstractmethod
    def evaluate_tasks(self, tasks: Mapping[str, Tensor], *, precision: str,
                       inner_steps: Optional[int] = None) -> dict:
        """Adapt to each task's support set and score its query set, no graph kept:
        ``acc_after_per_task`` ``[T]``, ``acc_before`` (0-dim, NaN where there is no before)
        and ``query_loss``. ``inner_steps`` overrides ``evaluation_steps``."""

    @abc.abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor, *, precision: str) -> Adapted:
        """Adapt to one support set (``[S, C, H, W]``, labels ``[S]`` in 0..N-1) exactly as
        ``evaluate_tasks`` does for each task; raises ``FloatingPointError`` when adapting
        gives non-finite values."""


def nan() -> Tensor:
    return torch.tensor(float("nan"))
