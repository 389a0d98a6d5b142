"""The standard MAML Omniglot Conv-4 ("cnn")."""

from torch import nn

from .layers import BatchStatNorm2d


def conv_block(in_channels: int, out_channels: int, bn_steps: int = 0,
               bn_stats: bool = False) -> nn.Sequential:
    """3x3 conv (padding 1), batch-statistics norm, ReLU, 2x2 max-pool: halves the size.

    The conv has no bias: the norm subtracts the batch mean, so a bias has exactly zero
    gradient. Adam would still turn the rounding noise of that zero into full-size steps
    (about lr per step, in a direction that differs between runs that sum in another order,
    such as one process and two), moving a parameter that does nothing."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        BatchStatNorm2d(out_channels, steps=bn_steps, running_stats=bn_stats),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """Conv-4 of Finn et al. (2017) for Omniglot: ``blocks`` conv blocks, then a linear head.

    Args:
        n_way: number of classes of a task (size of the head).
        width: channels of every conv block (64 in the MAML paper).
        in_channels: image channels (1 for Omniglot).
        image_size: side of the square input; 28 gives 28 -> 14 -> 7 -> 3 -> 1.
        blocks: number of conv blocks (4; fewer only for tiny test models).
        bn_steps: 0, or S: per-step batch-norm weights and biases, one set per inner step
            (MAML++'s BNWB; ``layers.BatchStatNorm2d``).
        bn_stats: with ``bn_steps``, per-step running statistics (MAML++'s BNRS).

    ``features`` maps images to flat feature vectors, ``classifier`` maps those to logits;
    the meta-learning algorithms select parameters by these two names.
    """

    features_then_classifier = True  # forward = classifier(features(x)): see meta.objective

    def __init__(self, n_way: int, width: int = 64, in_channels: int = 1,
                 image_size: int = 28, blocks: int = 4, bn_steps: int = 0,
                 bn_stats: bool = False):
        super().__init__()
        layers, channels, side = [], in_channels, image_size
        for _ in range(blocks):
            layers.append(conv_block(channels, width, bn_steps, bn_stats))
            channels, side = width, side // 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {blocks} blocks")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(width * side * side, n_way)

    def forward(self, x):
        return self.classifier(self.features(x))
