"""MAML, BOIL and ANIL: one inner loop, differing only in which parameters adapt.

- ``maml`` (Finn et al., 2017) adapts every parameter;
- ``boil`` (Oh et al., 2021) adapts the body (``features.*``); the head is frozen in the inner
  loop but still meta-learned in the outer step;
- ``anil`` (Raghu et al., 2020) adapts the head (``classifier.*``) only.

All three meta-learn every parameter in the outer step; only the inner loop differs.
"""

from collections.abc import Iterable, Mapping
from numbers import Real

import torch
from torch import nn

GROUPS = ("features", "classifier")
ADAPTED_GROUPS = {
    "maml": ("features", "classifier"),
    "boil": ("features",),
    "anil": ("classifier",),
}
ALGORITHMS = tuple(ADAPTED_GROUPS)

# Inner step sizes per algorithm and group, for configs to start from (0.4 is MAML's Omniglot
# value; BOIL and ANIL report using MAML's settings). Passed explicitly as ``inner_lr``:
# nothing in the inner loop has a hidden default step size.
DEFAULT_INNER_LR = {
    "maml": {"features": 0.4, "classifier": 0.4},
    "boil": {"features": 0.4},
    "anil": {"classifier": 0.4},
}


def group_of(name: str) -> str:
    """The group ("features" or "classifier") of a parameter name."""
    group = name.split(".", 1)[0]
    if group not in GROUPS:
        raise ValueError(f"parameter {name!r} is neither in 'features' nor in 'classifier'")
    return group


def adapted_parameter_names(algorithm: str, names: Iterable[str]) -> list[str]:
    """The names among ``names`` that ``algorithm`` adapts in the inner loop, in order."""
    if algorithm not in ADAPTED_GROUPS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    groups = ADAPTED_GROUPS[algorithm]
    return [n for n in names if group_of(n) in groups]


class LearnedInnerLR(nn.Module):
    """One learnable inner step size per adapted parameter tensor (Meta-SGD, per layer).

    Pass it as ``inner_lr=`` to ``meta_loss``; its parameters are meta-learned with the model
    (add them to the optimizer and the checkpoint). The step sizes are raw values, as in
    Meta-SGD: the outer optimiser may shrink or even flip them.

    Args:
        model: the model whose adapted parameters get a step size each.
        algorithm: "maml", "boil" or "anil" (which parameters adapt).
        init: initial step size, a float or ``{"features": a, "classifier": b}``.

    Example::

        lrs = LearnedInnerLR(model, "maml", 0.4)
        optimizer = torch.optim.Adam([*model.parameters(), *lrs.parameters()], 1e-3)
        loss, stats = meta_loss(model, tasks, algorithm="maml", inner_steps=1, inner_lr=lrs)
    """

    def __init__(self, model: nn.Module, algorithm: str, init):
        super().__init__()
        self.algorithm = algorithm
        names = adapted_parameter_names(algorithm, [n for n, _ in model.named_parameters()])
        values = resolve_inner_lr(init, names)
        # Module attribute names cannot hold dots.
        self.lrs = nn.ParameterDict({
            n.replace(".", "__"): nn.Parameter(torch.tensor(float(values[n]))) for n in names})

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: step size}``, differentiable."""
        return {key.replace("__", "."): lr for key, lr in self.lrs.items()}

    def extra_repr(self) -> str:
        return f"algorithm={self.algorithm!r}"


def resolve_inner_lr(inner_lr, names: Iterable[str]) -> dict:
    """``{name: step size}`` for the adapted ``names``.

    ``inner_lr`` is a float (every adapted parameter), a mapping from group ("features",
    "classifier") to float, or a ``LearnedInnerLR``. A group that adapts must be given.
    """
    names = list(names)
    if isinstance(inner_lr, LearnedInnerLR):
        lrs = inner_lr.as_dict()
        missing = [n for n in names if n not in lrs]
        if missing:
            raise ValueError(f"LearnedInnerLR ({inner_lr.algorithm}) has no step size for "
                             f"{missing[:3]}...; build it with the same algorithm and model")
        return {n: lrs[n] for n in names}
    if isinstance(inner_lr, Real):
        return {n: float(inner_lr) for n in names}
    if isinstance(inner_lr, Mapping):
        unknown = set(inner_lr) - set(GROUPS)
        if unknown:
            raise ValueError(f"inner_lr groups must be among {GROUPS}, got {sorted(unknown)}")
        missing = {group_of(n) for n in names} - set(inner_lr)
        if missing:
            raise ValueError(f"inner_lr has no step size for adapted group(s) {sorted(missing)}")
        return {n: float(inner_lr[group_of(n)]) for n in names}
    raise TypeError(f"inner_lr must be a float, a group mapping or LearnedInnerLR, "
                    f"not {type(inner_lr).__name__}")
