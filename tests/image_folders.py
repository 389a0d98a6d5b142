"""Image folders for the folder packer's tests: a layout of mixed formats, modes and odd sizes
written from random pixels, and characters of the official Omniglot zip as an image folder."""

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# class -> (count, mode, file format, width, height): mixed formats, modes and odd sizes;
# "eps" is the small class
LAYOUT = {
    "alpha": (6, "RGB", "png", 40, 30),
    "beta": (5, "RGB", "jpeg", 50, 50),
    "delta": (4, "P", "png", 20, 45),
    "eps": (2, "RGB", "jpeg", 17, 19),
    "gamma": (7, "RGBA", "png", 33, 21),
    "kappa": (5, "RGB", "png", 12, 12),
}


def random_image(rng, mode, width, height) -> Image.Image:
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "RGBA":
        pixels[:, : width // 2, 3] = 0  # left half fully transparent
        return Image.fromarray(pixels, "RGBA")
    rgb = Image.fromarray(pixels[:, :, :3], "RGB")
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def write_folder(root, layout=LAYOUT, seed=0):
    rng = np.random.default_rng(seed)
    for name, (count, mode, kind, width, height) in layout.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            random_image(rng, mode, width, height).save(root / name / f"{i:03d}.{kind}")
    return root



def write_omniglot_folder(source: Path, root: Path, alphabets, *,
                          by_alphabet: bool = False) -> Path:
    """The characters of background `alphabets` of the official zip as an image folder, one
    class folder of PNGs (unchanged) per character: named `characterNN`, or, with by_alphabet,
    `<alphabet>.characterNN`, since character names repeat across alphabets."""
    with zipfile.ZipFile(source / "images_background.zip") as archive:
        for member in archive.namelist():
            parts = member.split("/")  # images_background/<alphabet>/<character>/<file>.png
            if len(parts) == 4 and parts[1] in alphabets and parts[3].endswith(".png"):
                character = f"{parts[1]}.{parts[2]}" if by_alphabet else parts[2]
                (root / character).mkdir(parents=True, exist_ok=True)
                (root / character / parts[3]).write_bytes(archive.read(member))
    return root
