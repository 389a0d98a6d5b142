"""``model.init_from``: start a model from the body of a trained one.

The body is every tensor named ``features.*`` (the built-in models' body; the head,
``classifier.*``, starts fresh). Exactly those tensors are copied, bit for bit; anything that
does not fit is refused in one line naming the keys and shapes. A model with per-step
batch-norm weights (MAML++'s BNWB, ``[inner steps, channels]``) takes the trained
``[channels]`` weights in every step's set; its per-step running statistics, which a model
without them does not have, start as a fresh model's.

    load_backbone(model, trained_model.state_dict(), "runs/omniglot_cnn-0")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fsl_dist.config import ConfigError
from fsl_dist.models import per_step_parameter_names

BODY = "features."
SHOWN = 3  # keys named in a refusal; the rest are counted


def body_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(BODY)}


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(n) for n in t.shape) + "]"


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _fits(name: str, source: torch.Tensor, target: torch.Tensor, per_step: set) -> bool:
    """Same shape, or a per-step set of ``source``'s shape (BNWB from a plain batch norm)."""
    if source.shape == target.shape:
        return True
    return name in per_step and target.shape[1:] == source.shape


def body_problem(model: nn.Module, source: dict, where: str) -> str | None:
    """Why the body ``source`` does not fit ``model`` (one line), or None."""
    target = {k: v for k, v in model.state_dict().items() if k.startswith(BODY)}
    parameters = {k for k, _ in model.named_parameters() if k.startswith(BODY)}
    if not target:
        return (f"`model.init_from` = {where}: this model has no `features` body to start "
                "from it (its parameters must be named features.*)")
    if not source:
        return f"`model.init_from` = {where}: its model has no `features.*` weights"
    per_step = per_step_parameter_names(model)
    missing = sorted(parameters - set(source))
    extra = sorted(set(source) - set(target))
    shapes = [f"{k} {_shape(source[k])} there, {_shape(target[k])} here"
              for k in sorted(set(source) & set(target))
              if not _fits(k, source[k], target[k], per_step)]
    what = []
    if shapes:
        what.append(f"shapes differ: {_listed(shapes)}")
    if missing:
        what.append(f"it lacks {_listed(missing)}")
    if extra:
        what.append(f"this model has no {_listed(extra)}")
    if not what:
        return None
    return (f"`model.init_from` = {where}: its body does not fit the configured model ("
            f"{'; '.join(what)}); set the model section (name, width) and the data (image "
            "size, channels) as it was trained")


@torch.no_grad()
def load_backbone(model: nn.Module, state: dict, where: str) -> list[str]:
    """Copy the body (``features.*``) of ``state`` into ``model`` exactly; returns the names
    copied. ``where`` names the source in a refusal (ConfigError)."""
    source = body_of(state)
    problem = body_problem(model, source, where)
    if problem:
        raise ConfigError(problem)
    target = model.state_dict()
    for name, tensor in source.items():
        target[name].copy_(tensor.to(target[name].dtype).expand_as(target[name]))
    return sorted(source)


def start_from(model: nn.Module, path: str) -> list[str]:
    """``model.init_from``: load the body of the trained model at ``path`` (a run folder or a
    folder holding model.safetensors and model.yaml) into ``model``; returns the names copied.
    A path that is missing or holds no trained model is refused in one line (ConfigError)."""
    from fsl_dist.trained import read_trained  # the one reader of the trained-model format

    if not Path(path).exists():
        raise ConfigError(f"`model.init_from` = {path} does not exist; give a run folder (of "
                          "fsl-pretrain or fsl-train) or a folder holding model.safetensors and "
                          "model.yaml")
    try:
        trained = read_trained(path, "cpu")
    except (ValueError, FileNotFoundError) as err:  # a file missing, weights that do not fit
        raise ConfigError(f"`model.init_from` = {path}: {str(err).splitlines()[0]}") from None
    return load_backbone(model, trained.model.state_dict(), path)
