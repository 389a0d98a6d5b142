"""Backbones for few-shot classification: plain ``nn.Module``s, no meta-learning logic.

Every built-in model has a body ``features`` (images -> flat feature vectors) and a head
``classifier`` (features -> logits); these names are part of the API, since the algorithms
in ``fsl_dist.meta`` choose which parameters adapt by them. A model of your own is named by
its import path, ``package.module:function`` (``build_model``), and says which of its
parameters adapt with ``algorithm.adapt``. No model keeps buffers that change
in ``forward`` (batch norm uses batch statistics, see ``layers.BatchStatNorm2d``); per-step
running statistics (``bn_stats``) are buffers that only the trainer updates, between steps.

Example::

    model = build_model("cnn", n_way=5, width=64)
"""

import importlib
import os
import sys

from torch import nn

from fsl_dist.config import ConfigError, is_import_path

from .conv4 import Conv4
from .layers import (
    BatchStatNorm2d,
    collect_batch_stats,
    inner_step,
    per_step_parameter_names,
    running_stats_norms,
    update_running_stats,
)
from .resnet import ResNet12
from .resnet12 import StandardResNet12

MODELS = {"cnn": Conv4, "resnet": ResNet12, "resnet12": StandardResNet12}


# What a model of your own is given: the task's classes and the images' shape (from the
# shards' manifest); the other options are the built-in models'.
USER_MODEL_OPTIONS = ("in_channels", "image_size")


class ModelImportError(ConfigError):
    """``model.name`` is an import path that does not give a model builder."""


def build_model(name: str, n_way: int, **options) -> nn.Module:
    """Build the backbone ``name`` ("cnn", "resnet" or "resnet12") with an ``n_way`` head, or
    a model of your own named ``package.module:function``.

    ``options`` go to the model's constructor: ``width``, ``in_channels``, ``image_size``,
    ``bn_steps`` (per-step batch-norm weights, MAML++'s BNWB), ``bn_stats`` (with them,
    per-step running statistics, BNRS) for all;
    ``blocks`` for "cnn"; ``widths`` for "resnet"; ``drop_rate``, ``dropblock_size`` for
    "resnet12". Unknown options raise ``TypeError``. A model of your own is built by
    ``function(n_way=..., in_channels=..., image_size=...)`` (the module is imported from the
    installed packages or the current folder); the built-in models' options must then be off.
    """
    if is_import_path(name):
        return _build_user_model(name, n_way, options)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)} or an "
                         "import path package.module:function")
    return MODELS[name](n_way, **options)


def _build_user_model(name: str, n_way: int, options: dict) -> nn.Module:
    builtin_only = [k for k in ("bn_steps", "bn_stats", "drop_rate") if options.get(k)]
    if builtin_only:
        raise ModelImportError(f"model {name}: {', '.join(builtin_only)} belong to the built-in "
                               "models (per-step batch norm, DropBlock); turn them off")
    model = import_builder(name)(n_way=n_way, **{k: options[k] for k in USER_MODEL_OPTIONS
                                                   if k in options})
    if not isinstance(model, nn.Module):
        raise ModelImportError(f"model {name} returned {type(model).__name__}, not an nn.Module")
    return model


def import_builder(name: str):
    """The callable ``package.module:function`` names; ``ModelImportError`` (one line) if it
    cannot be imported. The current folder is searched after the installed packages."""
    module_name, _, attribute = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # python launch/train.py puts launch/ there, not the cwd
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelImportError(f"model {name}: cannot import {module_name} ({err}); install it "
                               "or run from the folder that holds it") from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelImportError(f"model {name}: {module_name} has no {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelImportError(f"model {name}: {attribute} is not callable")
    return target


__all__ = ["MODELS", "ModelImportError", "build_model", "import_builder", "is_import_path",
           "Conv4", "ResNet12", "StandardResNet12", "BatchStatNorm2d",
           "collect_batch_stats", "inner_step", "per_step_parameter_names",
           "running_stats_norms", "update_running_stats"]
