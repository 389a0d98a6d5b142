"""The ResNet-12 of the mini-ImageNet benchmarks ("resnet12"): MetaOptNet's and BOIL's backbone.

Kept apart from the small Omniglot ``resnet`` (resnet.py), whose widths and plain ReLU stay as
they were trained.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BatchStatNorm2d

# Block widths of the literature's ResNet-12; ``width`` is the first and scales all four.
WIDTH_RATIOS = (64, 160, 320, 640)
# MetaOptNet's leaky ReLU slope.
NEGATIVE_SLOPE = 0.1


def block_widths(width: int) -> tuple[int, ...]:
    """The four block widths for a first-block ``width`` (64 gives 64-160-320-640)."""
    return tuple(max(1, round(width * r / WIDTH_RATIOS[0])) for r in WIDTH_RATIOS)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., 2018): zero square blocks of a feature map, training mode only.

    Random, so it is off by default (``model.drop_rate``) and in eval mode, which
    ``evaluate_tasks`` sets while it evaluates. Under ``vmap`` the meta-objective draws
    different masks per task (vmap's ``randomness="different"``). Masks are drawn anew at every
    forward, so a task's inner steps see different masks; the meta-gradient tests run with it
    off.
    """

    def __init__(self, drop_rate: float, block_size: int):
        super().__init__()
        if not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate, self.block_size = drop_rate, block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        side = x.shape[-1]
        size = min(self.block_size, side)
        size -= 1 - size % 2  # odd, so that the padded max-pool keeps the map's size
        # Seed rate such that about drop_rate of the positions end up dropped (the paper's gamma).
        gamma = self.drop_rate / size**2 * side**2 / (side - size + 1) ** 2
        seeds = (torch.rand_like(x) < gamma).to(x.dtype)
        keep = 1 - F.max_pool2d(seeds, size, stride=1, padding=size // 2)
        return x * keep * (keep.numel() / keep.sum().clamp(min=1))

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"


def conv_norm(in_channels: int, out_channels: int, kernel: int,
              bn_steps: int = 0, bn_stats: bool = False) -> nn.Sequential:
    """Conv without bias (the norm's mean subtraction cancels it) and batch-statistics norm."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2,
                                   bias=False),
                         BatchStatNorm2d(out_channels, steps=bn_steps, running_stats=bn_stats))


class Block(nn.Module):
    """Three 3x3 conv + norm (leaky ReLU between), a 1x1 conv + norm shortcut, leaky ReLU,
    2x2 max-pool, then DropBlock (identity when ``drop_rate`` is 0)."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float,
                 dropblock_size: int, bn_steps: int = 0,
                 bn_stats: bool = False):
        super().__init__()
        self.conv1 = conv_norm(in_channels, out_channels, 3, bn_steps, bn_stats)
        self.conv2 = conv_norm(out_channels, out_channels, 3, bn_steps, bn_stats)
        self.conv3 = conv_norm(out_channels, out_channels, 3, bn_steps, bn_stats)
        self.shortcut = conv_norm(in_channels, out_channels, 1, bn_steps, bn_stats)
        self.relu = nn.LeakyReLU(NEGATIVE_SLOPE)
        self.pool = nn.MaxPool2d(2)
        self.drop = DropBlock(drop_rate, dropblock_size)

    def forward(self, x):
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        out = self.conv3(out)
        return self.drop(self.pool(self.relu(out + self.shortcut(x))))


class StandardResNet12(nn.Module):
    """ResNet-12 for 84x84 images: four ``Block``s (84 -> 42 -> 21 -> 10 -> 5), global average
    pool, linear head.

    Args:
        n_way: number of classes of a task.
        width: the first block's width (64 in the literature); the others follow 64:160:320:640.
        in_channels: image channels (3 for mini-ImageNet).
        image_size: side of the square input.
        drop_rate: DropBlock's fraction of dropped positions after each block (0: off).
        dropblock_size: DropBlock's block side (5 in MetaOptNet), capped by the feature map.
        bn_steps: 0, or S: per-step batch-norm weights and biases (MAML++'s BNWB).
        bn_stats: with ``bn_steps``, per-step running statistics (MAML++'s BNRS).
    """

    features_then_classifier = True  # forward = classifier(features(x)): see meta.objective

    def __init__(self, n_way: int, width: int = 64, in_channels: int = 3,
                 image_size: int = 84, drop_rate: float = 0.0, dropblock_size: int = 5,
                 bn_steps: int = 0,
                 bn_stats: bool = False):
        super().__init__()
        widths = block_widths(width)
        if image_size // 2 ** len(widths) < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(widths)} blocks")
        blocks, channels = [], in_channels
        for w in widths:
            blocks.append(Block(channels, w, drop_rate, dropblock_size, bn_steps, bn_stats))
            channels = w
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, n_way)

    def forward(self, x):
        return self.classifier(self.features(x))
