"""Augmentation of natural images, batched in torch and seeded by key, never by global state.

Two sets, each with the output the size of the input:

- ``lee2019`` (MetaOptNet: Lee et al. 2019, github.com/kjunelee/MetaOptNet, data/mini_imagenet.py,
  the training transform; learn2learn's ``data_augmentation='lee2019'`` in
  vision/benchmarks/mini_imagenet_benchmark.py is the same): ``RandomCrop(84, padding=8)`` (pad
  8 black pixels on every side, cut a random window of the input's size: a shift of -8..8 pixels
  each way), ``ColorJitter(brightness=.4, contrast=.4, saturation=.4)`` (each factor uniform in
  [0.6, 1.4], the three applied in a random order), ``RandomHorizontalFlip()`` (p = 0.5), in
  that order. Both codes also normalise by the data set's mean and standard deviation, at
  training and test alike: that is not augmentation and is left out here.
- ``resized_crop``: torchvision's ``RandomResizedCrop`` (area fraction uniform in ``scale``,
  aspect ratio log-uniform in [3/4, 4/3], ten tries, then the whole square image) resized back
  bilinearly (as ``F.interpolate``, no antialias), then the same jitter and flip (mmfewshot's
  mini-ImageNet training pipeline: RandomResizedCrop(84), RandomFlip, ColorJitter(0.4, 0.4,
  0.4)).

Images are float ``[n, C, H, W]`` in [0, 1] (C = 1 or 3); the arithmetic follows torchvision's
tensor functions (jitter blends clamped to [0, 1] after each step, grey = 0.2989 R + 0.587 G
+ 0.114 B, saturation leaves one-channel images as they are). The reference codes jitter PIL
images (uint8 after each step); here it stays float, so values differ by at most about 1/255
per step.

Every image's parameters come from a ``torch.Generator`` seeded by a key (say train seed, step,
task index), so the same key gives the same images whichever process draws it and whatever was
drawn before. Example (a pre-training batch, one key per sample)::

    augment = Augment("lee2019")
    images = augment.each(images, [(seed, step, i) for i in sample_indices])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("none", "lee2019", "resized_crop")
GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
TRIES = 10  # RandomResizedCrop's tries before falling back to the whole image
STREAM = 0x617567  # "aug": keeps augmentation's draws apart from task sampling's (same keys)


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by ``key`` (non-negative integers) alone."""
    state = np.random.SeedSequence((*key, STREAM)).generate_state(2, np.uint32)
    seed = (int(state[0]) << 32 | int(state[1])) & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Augment:
    """One augmentation set and its parameters (the defaults are lee2019's)."""

    kind: str = "lee2019"  # lee2019 or resized_crop
    padding: int = 8  # lee2019: pixels of black border before the random crop
    scale: tuple = (0.08, 1.0)  # resized_crop: range of the crop's share of the image's area
    jitter: tuple = (0.4, 0.4, 0.4)  # brightness, contrast, saturation: factors in 1 -+ each
    flip: bool = True  # horizontal flip with probability 0.5

    def __post_init__(self):
        if self.kind not in KINDS[1:]:
            raise ValueError(f"augmentation {self.kind!r}; choose one of {', '.join(KINDS[1:])}")
        if self.padding < 0:
            raise ValueError(f"padding {self.padding} must not be negative")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale {list(self.scale)} must be [low, high] with 0 < low <= high "
                             "<= 1")
        if len(self.jitter) != 3 or not all(0 <= j <= 1 for j in self.jitter):
            raise ValueError(f"jitter {list(self.jitter)} must be three strengths in [0, 1] "
                             "(brightness, contrast, saturation)")

    @classmethod
    def from_config(cls, data) -> Optional["Augment"]:
        """The set ``data`` (a DataConfig) asks for, or None for ``augment: none``."""
        if data.augment == "none":
            return None
        return cls(data.augment, data.augment_padding, tuple(data.augment_scale),
                   tuple(data.augment_jitter), data.augment_flip)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``images`` [n, C, H, W] augmented, their parameters drawn in order from ``gen``."""
        return self.apply(images, self.sample(len(images), images.shape[-2:], gen))

    def each(self, images: torch.Tensor, keys: Sequence[tuple]) -> torch.Tensor:
        """``images`` [n, C, H, W] in ``len(keys)`` equal consecutive groups, group g augmented
        with parameters from ``generator(*keys[g])``: the result depends on the keys, not on
        which process holds which images."""
        if not keys or len(images) % len(keys):
            raise ValueError(f"{len(images)} images do not split into {len(keys)} equal groups")
        per = len(images) // len(keys)
        drawn = [self.sample(per, images.shape[-2:], generator(*key)) for key in keys]
        return self.apply(images, {name: torch.cat([d[name] for d in drawn]) for name in drawn[0]})

    def sample(self, count: int, size, gen: torch.Generator) -> dict:
        """Parameters of ``count`` images of ``size`` (H, W), drawn in a fixed order."""
        params = {}
        if self.kind == "lee2019":
            params["offset"] = torch.randint(0, 2 * self.padding + 1, (count, 2), generator=gen)
        else:
            params["box"] = _resized_crop_boxes(count, size, self.scale, gen)
        low = torch.tensor([max(0.0, 1 - j) for j in self.jitter])
        high = torch.tensor([1 + j for j in self.jitter])
        params["factor"] = low + (high - low) * torch.rand(count, 3, generator=gen)
        params["order"] = torch.rand(count, 3, generator=gen).argsort(dim=1)
        params["flip"] = torch.rand(count, generator=gen) < (0.5 if self.flip else 0.0)
        return params

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """Crop, jitter, flip with the drawn ``params``; uint8 images (0..255) are cropped as
        they are (less memory to move) and come back as floats in [0, 1]. The flip is folded
        into the crop: jitter acts on each pixel alone and on the image's mean, so flipping
        before it gives what flipping after it (lee2019's order) gives."""
        device = images.device
        flip = params["flip"].to(device)
        if self.kind == "lee2019":
            images = shift_crop(images, params["offset"].to(device), self.padding, flip)
        else:
            images = resized_crop(_unit(images), params["box"].to(device), flip)
        return jitter(_unit(images), params["factor"].to(device), params["order"].to(device))


def _unit(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(1.0 / 255.0)
    return images


def shift_crop(images: torch.Tensor, offsets: torch.Tensor, padding: int,
               flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torchvision's RandomCrop(size=(H, W), padding): pad with zeros, cut the window whose top
    left corner is ``offsets[i]`` (row, column) in the padded image; then mirror the images
    where ``flip`` is true. One gather for all images."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    columns = torch.arange(w, device=images.device).expand(n, w)
    if flip is not None:
        columns = torch.where(flip[:, None], columns.flip(1), columns)
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # [n, H]
    cols = offsets[:, 1:] + columns  # [n, W]
    flat = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).reshape(n, 1, h * w)
    return padded.reshape(n, c, -1).gather(2, flat.expand(n, c, h * w)).reshape(n, c, h, w)


def shift_offsets(radius: int) -> list[tuple[int, int]]:
    """The whole-pixel shifts (rows, columns) of at most ``radius`` steps, |dy| + |dx| <=
    radius, no shift first: 1 for radius 0, 5 for 1, 13 for 2 (``eval.test_shift``'s views)."""
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if abs(dy) + abs(dx) <= radius]
    return sorted(offsets, key=lambda o: (abs(o[0]) + abs(o[1]), o))


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``images`` moved by ``dy`` rows and ``dx`` columns, the vacated border black: the
    training shift's crop (``shift_crop``) with one offset for all images."""
    padding = max(abs(dy), abs(dx))
    if padding == 0:
        return images
    offsets = torch.tensor([[padding - dy, padding - dx]], device=images.device)
    return shift_crop(images, offsets.expand(len(images), 2), padding)


def _resized_crop_boxes(count: int, size, scale, gen: torch.Generator) -> torch.Tensor:
    """[count, 4] boxes (top, left, height, width) in pixels, as RandomResizedCrop.get_params:
    the first of ten tries that fits, else the whole image (torchvision's fallback for square
    images, the only ones shards hold: a centre crop at an aspect ratio clamped to 3/4..4/3)."""
    h, w = int(size[0]), int(size[1])
    area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(count, TRIES, generator=gen))
    log_ratio = torch.tensor(RATIO).log()
    ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0])
                      * torch.rand(count, TRIES, generator=gen))
    widths = torch.round(torch.sqrt(area * ratio))
    heights = torch.round(torch.sqrt(area / ratio))
    fits = (widths > 0) & (widths <= w) & (heights > 0) & (heights <= h)
    first = torch.where(fits.any(1), fits.int().argmax(1), -1)
    pick = first.clamp(min=0)[:, None]
    height = torch.where(first >= 0, heights.gather(1, pick)[:, 0], torch.tensor(float(h)))
    width = torch.where(first >= 0, widths.gather(1, pick)[:, 0], torch.tensor(float(w)))
    where = torch.rand(count, 2, generator=gen)  # uniform integer corners, as randint
    top = torch.floor(where[:, 0] * (h - height + 1))
    left = torch.floor(where[:, 1] * (w - width + 1))
    return torch.stack([top, left, height, width], dim=1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor,
                 flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each image's box (top, left, height, width; whole pixels) cut out and resized to the
    image's size as torchvision's resized_crop does on tensors: bilinear, half-pixel centres,
    no antialias (the box is never larger than the output, so resizing only enlarges, where
    antialiasing changes nothing), samples clamped to the box's own edge pixels; mirrored
    where ``flip`` is true. Separable: a gather and blend along rows, then along columns."""
    n, c, h, w = images.shape
    top, left, height, width = boxes.long().unbind(1)
    rows = _bilinear_taps(top, height, h)
    cols = _bilinear_taps(left, width, w)
    if flip is not None:
        cols = tuple(torch.where(flip[:, None], t.flip(1), t) for t in cols)
    (r0, r1, wr), (c0, c1, wc) = rows, cols
    wr, wc = wr.to(images.dtype), wc.to(images.dtype)

    def along_rows(index):
        return images.gather(2, index[:, None, :, None].expand(n, c, h, w))

    def along_cols(source, index):
        return source.gather(3, index[:, None, None, :].expand(n, c, h, w))

    tall = along_rows(r0).lerp_(along_rows(r1), wr[:, None, :, None])  # in place: see jitter
    return along_cols(tall, c0).lerp_(along_cols(tall, c1), wc[:, None, None, :])


def _bilinear_taps(start: torch.Tensor, length: torch.Tensor, out: int):
    """For ``out`` output pixels reading a span of ``length`` input pixels from ``start``: the
    two input indices and the weight of the second, as torch's upsample_bilinear2d
    (align_corners=False): source = (i + 0.5) * length / out - 0.5, at least 0."""
    scale = (length.to(torch.float32) / out)[:, None]
    centres = torch.arange(out, dtype=torch.float32, device=start.device) + 0.5
    real = (centres * scale - 0.5).clamp(min=0)
    first = real.floor().long()
    second = torch.minimum(first + 1, (length - 1)[:, None])
    return start[:, None] + first, start[:, None] + second, real - first


def jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter's brightness, contrast and saturation (``factors[i]``, in that column order),
    applied in the order ``order[i]`` (a permutation of 0, 1, 2), each a blend with black, the
    grey mean or the grey image, clamped to [0, 1]. In place on ``images`` (fresh pages cost
    more than the arithmetic: in place it is several times faster on a CPU)."""
    n, c = images.shape[:2]
    shape = (n, 1, 1, 1)
    towards = images.new_empty((n, 1, *images.shape[2:]))
    for stage in range(3):
        op = order[:, stage]
        f = factors.gather(1, op[:, None])[:, 0].to(images.dtype)
        if c == 1:  # torchvision's adjust_saturation returns one-channel images unchanged
            f = torch.where(op == 2, torch.ones_like(f), f)
        rest = (1 - f).view(shape)
        _grey_into(towards, images)
        mean = towards.mean(dim=(1, 2, 3), keepdim=True)
        towards.mul_(rest * (op == 2).view(shape)).add_(mean * rest * (op == 1).view(shape))
        images.mul_(f.view(shape)).add_(towards).clamp_(0, 1)
    return images


def _grey_into(out: torch.Tensor, images: torch.Tensor) -> None:
    """``out`` [n, 1, H, W] = the grey of ``images`` (themselves when one channel)."""
    if images.shape[1] == 1:
        out.copy_(images)
        return
    torch.mul(images[:, 2:3], GREY[2], out=out)
    out.add_(images[:, 1:2], alpha=GREY[1]).add_(images[:, 0:1], alpha=GREY[0])
