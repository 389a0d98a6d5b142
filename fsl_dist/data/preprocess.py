"""The image preprocessing a shard set was packed with, as a record and as a function.

A model sees images as its shards hold them: ``uint8 [C, size, size]`` scaled to [0, 1]. How an
image file became those pixels depends on the packer, so the export (``model.yaml``) records it
and prediction applies the same steps to new images:

- ``omniglot`` (the Omniglot packer): grayscale, inverted (strokes bright on dark), the whole
  image resized to ``size`` x ``size`` with Lanczos when its size differs.
- ``folder`` (the folder and benchmark packers): converted to grayscale or RGB (transparency
  onto white), the shorter side resized to ``size`` (bilinear, antialiased), the centre square.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .folder import ONE_CHANNEL_MODES, convert_channels, resize_shorter_and_crop
from .omniglot import omniglot_pixels

POLICIES = {
    "omniglot": "grayscale, inverted (strokes bright on dark), whole image resized to size x "
                "size (Lanczos)",
    "folder": "grayscale or RGB (transparency onto white), shorter side resized to size "
              "(bilinear), centre square",
}


def preprocessing_of(data: dict) -> dict:
    """The record of how images of a shard set were made (``data``: a manifest or the
    ``data`` facts of run.json / model.yaml), as written to model.yaml."""
    policy = "omniglot" if data["dataset"] == "omniglot" else "folder"
    return {"policy": policy, "channels": data["channels"], "size": data["image_size"],
            "invert": policy == "omniglot", "scale": "pixel / 255", "steps": POLICIES[policy]}


def mode_channels(mode: str) -> int:
    """1 or 3: the channels of a Pillow image mode (as the folder packer counts them)."""
    return 1 if mode in ONE_CHANNEL_MODES or mode.startswith("I;16") else 3


def image_pixels(image: Image.Image, preprocessing: dict, *, convert: bool = False) -> np.ndarray:
    """One image -> ``uint8 [C, size, size]`` as its model's shards hold images.

    An image whose channel count differs from the model's is refused (``ValueError`` naming
    both counts) unless ``convert``, which converts it as the folder packer's ``--channels``
    does."""
    channels, size = preprocessing["channels"], preprocessing["size"]
    found = mode_channels(image.mode)
    if found != channels and not convert:
        raise ValueError(f"has {found} channel(s) ({image.mode}), the model takes {channels}")
    converted = convert_channels(image, channels)
    if preprocessing["policy"] == "omniglot":
        return omniglot_pixels(converted, size)[None]
    array = np.asarray(resize_shorter_and_crop(converted, size), dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)
