"""MAML, BOIL and ANIL: one inner loop, differing only in which parameters adapt.

- ``maml`` (Finn et al., 2017) adapts every parameter (of any ``nn.Module``);
- ``boil`` (Oh et al., 2021) adapts the body (``features.*``); the head is frozen in the inner
  loop but still meta-learned in the outer step;
- ``anil`` (Raghu et al., 2020) adapts the head (``classifier.*``) only.

All three meta-learn every parameter in the outer step; only the inner loop differs. A model
whose parameters are named otherwise (your own) says which adapt with an ``adapt`` rule: a
parameter-name prefix, a sequence of them, or a predicate ``name -> bool``; it replaces the
algorithm's own rule (``InnerLoopSpec(adapt=...)``, ``algorithm.adapt`` in a config).

Per-step batch-norm weights and biases (MAML++'s BNWB, ``BatchStatNorm2d(steps=S)``) never
adapt, whatever the algorithm: as in the MAML++ reference code (its default
``enable_inner_loop_optimizable_bn_params: False``), having one set per inner step is what
replaces adapting them; they are meta-learned in the outer step like every parameter.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real
from typing import Union

import torch
from torch import nn

from ..models.layers import per_step_parameter_names

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


# Which parameters adapt, when not the algorithm's own rule: a name prefix ("encoder" takes
# encoder.* and a parameter named encoder), a sequence of prefixes, or a predicate on the name.
AdaptRule = Union[None, str, Sequence[str], Callable[[str], bool]]


def under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies under ``prefix`` ("features" or "features."), at a dot."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def check_adapt_rule(adapt: AdaptRule) -> None:
    """Raise ``ValueError`` unless ``adapt`` is None, a prefix, prefixes or a predicate."""
    if adapt is None or callable(adapt) or isinstance(adapt, str):
        return
    if not (isinstance(adapt, Sequence) and adapt and all(isinstance(p, str) for p in adapt)):
        raise ValueError(f"adapt must be a parameter-name prefix, a list of them or a predicate "
                         f"name -> bool, not {adapt!r}")


def adapted_parameter_names(algorithm: str, names: Iterable[str],
                            adapt: AdaptRule = None) -> list[str]:
    """The names among ``names`` that adapt in the inner loop, in order: those ``adapt``
    selects, or without it ``algorithm``'s (maml: all; boil: ``features.*``; anil:
    ``classifier.*``). Raises ``ValueError`` when that selects nothing."""
    if algorithm not in ADAPTED_GROUPS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    check_adapt_rule(adapt)
    names = list(names)
    if adapt is None:
        rule = ((lambda n: True) if algorithm == "maml"
                else (lambda n: any(under(n, g) for g in ADAPTED_GROUPS[algorithm])))
        chosen = [n for n in names if rule(n)]
        if names and not chosen:
            raise ValueError(f"{algorithm} adapts the parameters under "
                             f"{' and '.join(ADAPTED_GROUPS[algorithm])}, and this model has "
                             f"none (it has {names[0]}, ...): say which adapt with adapt=")
        return chosen
    prefixes = (adapt,) if isinstance(adapt, str) else adapt
    rule = adapt if callable(adapt) else (lambda n: any(under(n, p) for p in prefixes))
    chosen = [n for n in names if rule(n)]
    if names and not chosen:
        raise ValueError(f"adapt={adapt!r} selects none of the model's parameters "
                         f"({names[0]}, ...)")
    return chosen


def inner_parameter_names(algorithm: str, model: nn.Module, adapt: AdaptRule = None) -> list[str]:
    """The names of ``model``'s parameters that adapt in the inner loop, in order:
    ``adapted_parameter_names`` less the per-step batch-norm parameters, which never adapt (see
    the module's docstring)."""
    fixed = per_step_parameter_names(model)
    names = [n for n, _ in model.named_parameters()]
    return [n for n in adapted_parameter_names(algorithm, names, adapt) if n not in fixed]


class LearnedInnerLR(nn.Module):
    """Learnable inner step sizes: one per adapted parameter tensor (Meta-SGD, per layer), or
    with ``steps`` one per inner step and adapted tensor (MAML++'s LSLR).

    Pass it as ``inner_lr=`` to ``meta_loss``; its parameters are meta-learned with the model
    (add them to the optimizer and the checkpoint). The step sizes are raw values, as in
    Meta-SGD and the MAML++ reference code: the outer optimiser may shrink or even flip them.

    Args:
        model: the model whose adapted parameters get a step size each.
        algorithm: "maml", "boil" or "anil" (which parameters adapt).
        init: initial step size, a float or ``{"features": a, "classifier": b}`` (every
            inner step starts from the same one).
        adapt: the rule of ``InnerLoopSpec.adapt``, if the spec has one.
        steps: None: one step size per tensor, ``lrs`` (a ParameterDict of scalars); an int:
            ``per_step``, one parameter of shape [steps, adapted tensors], row k holding the
            sizes of inner step k, columns in ``names`` order. An inner loop longer than
            ``steps`` (evaluation with more steps) takes the last row for the extra steps.

    Example::

        lrs = LearnedInnerLR(model, "maml", 0.4)
        optimizer = torch.optim.Adam([*model.parameters(), *lrs.parameters()], 1e-3)
        loss, stats = meta_loss(model, tasks, InnerLoopSpec("maml", 1, inner_lr=lrs))
    """

    def __init__(self, model: nn.Module, algorithm: str, init, steps: int | None = None,
                 adapt: AdaptRule = None):
        super().__init__()
        self.algorithm = algorithm
        self.names = inner_parameter_names(algorithm, model, adapt)
        values = resolve_inner_lr(init, self.names)
        if steps is None:
            # Module attribute names cannot hold dots.
            self.lrs = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(
                torch.tensor(float(values[n]))) for n in self.names})
        else:
            if steps < 1:
                raise ValueError(f"per-step inner step sizes need at least one step, got {steps}")
            row = [float(values[n]) for n in self.names]
            self.per_step = nn.Parameter(torch.tensor([row] * steps))

    @property
    def steps(self) -> int | None:
        """Inner steps with their own sizes (None: the same sizes at every step)."""
        return self.per_step.shape[0] if hasattr(self, "per_step") else None

    def as_dict(self):
        """``{parameter name: step size}``, differentiable; per step, a list of such dicts,
        one per inner step."""
        if self.steps is None:
            return {key.replace("__", "."): lr for key, lr in self.lrs.items()}
        return [dict(zip(self.names, row.unbind(0))) for row in self.per_step.unbind(0)]

    def extra_repr(self) -> str:
        return f"algorithm={self.algorithm!r}, steps={self.steps}"


def learned_inner_lr(model: nn.Module, algorithm: str, init, learn, inner_steps: int,
                     adapt: AdaptRule = None):
    """The ``LearnedInnerLR`` a config's ``algorithm.learn_inner_lr`` asks for: true, one size
    per adapted tensor; "per_step", one per training inner step and adapted tensor. The one
    place mapping the setting to the module, for training and for loading a trained model."""
    return LearnedInnerLR(model, algorithm, init,
                          steps=inner_steps if learn == "per_step" else None, adapt=adapt)


def resolve_inner_lr(inner_lr, names: Iterable[str]) -> dict | list[dict]:
    """``{name: step size}`` for the adapted ``names``; for a per-step ``LearnedInnerLR`` a
    list of them, one per inner step (what ``inner.adapt`` takes as ``lrs``).

    ``inner_lr`` is a float (every adapted parameter), a mapping from parameter-name prefix
    (the groups "features", "classifier", or any prefix of your model's names) to float, each
    name taking its longest matching prefix, or a ``LearnedInnerLR``. Every adapted name must
    be covered.
    """
    names = list(names)
    if isinstance(inner_lr, LearnedInnerLR):
        lrs = inner_lr.as_dict()
        per_step = lrs if isinstance(lrs, list) else [lrs]
        missing = [n for n in names if n not in per_step[0]]
        if missing:
            raise ValueError(f"LearnedInnerLR ({inner_lr.algorithm}) has no step size for "
                             f"{missing[:3]}...; build it with the same algorithm and model")
        per_step = [{n: step[n] for n in names} for step in per_step]
        return per_step if isinstance(lrs, list) else per_step[0]
    if isinstance(inner_lr, Real):
        return {n: float(inner_lr) for n in names}
    if isinstance(inner_lr, Mapping):
        def prefix_of(name):
            matching = [p for p in inner_lr if under(name, p)]
            return max(matching, key=len) if matching else None
        missing = [n for n in names if prefix_of(n) is None]
        if missing:
            raise ValueError(f"inner_lr {sorted(inner_lr)} has no step size for the adapted "
                             f"parameter(s) {missing[:3]}")
        return {n: float(inner_lr[prefix_of(n)]) for n in names}
    raise TypeError(f"inner_lr must be a float, a group mapping or LearnedInnerLR, "
                    f"not {type(inner_lr).__name__}")
