"""A ResNet-12-style backbone sized for 28x28 Omniglot ("resnet")."""

from torch import nn

from .layers import BatchStatNorm2d

# ResNet-12 for miniImageNet uses widths (64, 160, 320, 640) on 84x84 images. Omniglot is
# 28x28 grayscale strokes that Conv-4 (113k parameters) already solves to ~98%: these widths
# keep the residual structure at about 1.6x Conv-4's compute per image (0.5M parameters);
# the miniImageNet widths would cost ~40x and make second-order MAML impractical here.
DEFAULT_WIDTHS = (16, 32, 64, 128)


class ResidualBlock(nn.Module):
    """Three 3x3 conv + norm layers (ReLU between), a 1x1 conv + norm projection shortcut,
    then ReLU and a 2x2 max-pool (the ResNet-12 block)."""

    def __init__(self, in_channels: int, out_channels: int, bn_steps: int = 0,
                 bn_stats: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = BatchStatNorm2d(out_channels, steps=bn_steps, running_stats=bn_stats)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = BatchStatNorm2d(out_channels, steps=bn_steps, running_stats=bn_stats)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = BatchStatNorm2d(out_channels, steps=bn_steps, running_stats=bn_stats)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            BatchStatNorm2d(out_channels, steps=bn_steps, running_stats=bn_stats))
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.pool(self.relu(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """Residual backbone (one ``ResidualBlock`` per width) with a global average pool and a
    linear head.

    Args:
        n_way: number of classes of a task.
        widths: output channels of each block; each block halves the image side.
        width: shorthand for ``widths = (w, 2w, 4w, 8w)`` (ignored when ``widths`` is given).
        in_channels: image channels (1 for Omniglot).
        image_size: side of the square input (28 gives 28 -> 14 -> 7 -> 3 -> 1 with 4 blocks).
        bn_steps: 0, or S: per-step batch-norm weights and biases (MAML++'s BNWB).
        bn_stats: with ``bn_steps``, per-step running statistics (MAML++'s BNRS).
    """

    features_then_classifier = True  # forward = classifier(features(x)): see meta.objective

    def __init__(self, n_way: int, widths=None, width: int | None = None,
                 in_channels: int = 1, image_size: int = 28, bn_steps: int = 0,
                 bn_stats: bool = False):
        super().__init__()
        if widths is None:
            widths = DEFAULT_WIDTHS if width is None else tuple(width * 2**i for i in range(4))
        if image_size // 2 ** len(widths) < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(widths)} blocks")
        blocks, channels = [], in_channels
        for w in widths:
            blocks.append(ResidualBlock(channels, w, bn_steps, bn_stats))
            channels = w
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, n_way)

    def forward(self, x):
        return self.classifier(self.features(x))
