"""The benchmark's cases (model, algorithm, task shape, inner steps, meta-batch) and their
synthetic tasks."""

import argparse
import re

import torch

# (n_way, k_shot, n_query) task shapes of the full grid.
TASK_SHAPES = ((5, 1, 15), (20, 1, 5))


def parse_task(name: str) -> tuple:
    """"5w1s15q" -> (5, 1, 15)."""
    match = re.fullmatch(r"(\d+)w(\d+)s(\d+)q", name)
    if not match:
        raise argparse.ArgumentTypeError(
            f"task {name!r}: expected N-way K-shot Q-query as e.g. 5w1s15q")
    return tuple(int(g) for g in match.groups())


# The images of the default grid; a case records its size, channels and width only where it
# departs from these, so that the saved runs of the 28x28 grid keep their rows and keys.
IMAGE_SIZE, CHANNELS = 28, 1


def cases(quick: bool, models=("cnn", "resnet"), algorithms=("maml", "boil", "anil"),
          inner_steps=None, meta_batches=None, shapes=None, image_size=IMAGE_SIZE,
          channels=CHANNELS, width=None):
    shapes = shapes or (TASK_SHAPES[:1] if quick else TASK_SHAPES)
    steps = inner_steps or ((1,) if quick else (1, 5))
    batches = meta_batches or ((8,) if quick else (8, 32))
    extra = {}
    if (image_size, channels) != (IMAGE_SIZE, CHANNELS):
        extra |= {"image_size": image_size, "channels": channels}
    if width is not None:
        extra["width"] = width
    return [{"model": m, "algorithm": a, "n_way": n, "k_shot": k, "n_query": q,
             "inner_steps": s, "meta_batch": b, **extra}
            for m in models for a in algorithms for (n, k, q) in shapes
            for s in steps for b in batches]


def model_options(case) -> dict:
    """``build_model`` options of the case: the same model for every method."""
    options = {"in_channels": case.get("channels", CHANNELS),
               "image_size": case.get("image_size", IMAGE_SIZE)}
    if "width" in case:
        options["width"] = case["width"]
    return options


def model_label(case) -> str:
    """The model column: the name, plus width and image shape where the case sets them."""
    label = case["model"] + (f"-{case['width']}" if "width" in case else "")
    if "image_size" in case:
        label += f" {case['image_size']}x{case['image_size']}x{case['channels']}"
    return label


def task_name(case) -> str:
    return f"{case['n_way']}w{case['k_shot']}s{case['n_query']}q"


def synthetic_tasks(case, device, meta_batch=None):
    """Binary images (20% ones) of the case's size and channels (28x28x1 unless it says) and
    class labels; the same for every method (seed 0)."""
    meta_batch = case["meta_batch"] if meta_batch is None else meta_batch
    n_way = case["n_way"]
    size, channels = case.get("image_size", IMAGE_SIZE), case.get("channels", CHANNELS)
    g = torch.Generator().manual_seed(0)

    def images(n):
        x = torch.rand(meta_batch, n, channels, size, size, generator=g) < 0.2
        return x.float().to(device)

    def labels(per_class):
        return torch.arange(n_way).repeat(per_class).expand(meta_batch, -1).contiguous().to(device)
    return {"support_x": images(n_way * case["k_shot"]), "support_y": labels(case["k_shot"]),
            "query_x": images(n_way * case["n_query"]), "query_y": labels(case["n_query"])}
