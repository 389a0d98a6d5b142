"""Backbones for few-shot classification: plain ``nn.Module``s, no meta-learning logic.

Every model has a body ``features`` (images -> flat feature vectors) and a head
``classifier`` (features -> logits); these names are part of the API, since the algorithms
in ``fsl_dist.meta`` choose which parameters adapt by them. No model keeps buffers that change
in ``forward`` (batch norm uses batch statistics, see ``layers.BatchStatNorm2d``); per-step
running statistics (``bn_stats``) are buffers that only the trainer updates, between steps.

Example::

    model = build_model("cnn", n_way=5, width=64)
"""

from torch import nn

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


def build_model(name: str, n_way: int, **options) -> nn.Module:
    """Build the backbone ``name`` ("cnn", "resnet" or "resnet12") with an ``n_way`` head.

    ``options`` go to the model's constructor: ``width``, ``in_channels``, ``image_size``,
    ``bn_steps`` (per-step batch-norm weights, MAML++'s BNWB), ``bn_stats`` (with them,
    per-step running statistics, BNRS) for all;
    ``blocks`` for "cnn"; ``widths`` for "resnet"; ``drop_rate``, ``dropblock_size`` for
    "resnet12". Unknown options raise ``TypeError``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](n_way, **options)


__all__ = ["MODELS", "build_model", "Conv4", "ResNet12", "StandardResNet12", "BatchStatNorm2d",
           "collect_batch_stats", "inner_step", "per_step_parameter_names",
           "running_stats_norms", "update_running_stats"]
