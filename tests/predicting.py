"""Helpers of the prediction tests: exports made by the trainer's own export code, and
evaluation episodes written out as image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsl_dist.config import load_config, save_config
from fsl_dist.data.episodes import TaskSpec, make_tasks
from fsl_dist.data.shards import load_manifest
from fsl_dist.learners import learner_from_config
from fsl_dist.trained import (
    build_described,
    build_run_model,
    model_facts,
    model_inputs,
    write_trained,
)

ROOT = Path(__file__).resolve().parents[1]


def export(folder: Path, shards: Path, *overrides: str, seed: int = 0) -> Path:
    """A freshly initialised model written by ``write_trained``, as a trained run's."""
    cfg = load_config(ROOT / "configs" / "cnn_maml.yaml", [f"data.shards={shards}", *overrides])
    manifest = load_manifest(shards)
    torch.manual_seed(seed)
    model = build_run_model(cfg, model_inputs(manifest))
    learner = learner_from_config(cfg, model)
    with torch.no_grad():  # distinct learned values (step sizes, a scale): a mix-up would show
        for k, value in enumerate(learner.parameters()[len(list(model.parameters())):]):
            value.mul_(1.5 + 0.1 * k)
    folder.mkdir(parents=True, exist_ok=True)
    write_trained(folder, model, cfg, manifest, extras=learner.extras())
    return folder


def export_pretrained(folder: Path, shards: Path, *overrides: str, seed: int = 0) -> Path:
    """A run folder of fsl-pretrain's shipped Omniglot config: config.yaml, and a freshly
    initialised model with a head over every (train class, quarter turn) written by
    ``write_trained`` as fsl-pretrain's export writes it."""
    cfg = load_config(ROOT / "configs" / "pretrain" / "omniglot_cnn.yaml",
                      [f"data.shards={shards}", *overrides])
    manifest = load_manifest(shards)
    classes = 4 * manifest["splits"]["train"]["classes"]
    torch.manual_seed(seed)
    model = build_described(model_facts(cfg, model_inputs(manifest), n_way=classes))
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    write_trained(folder, model, cfg, manifest, step=cfg.train.steps, pretrained=classes)
    return folder


def episodes(shards: Path, n_way: int, k_shot: int, q_query: int, seed: int, count: int,
             start: int = 0) -> dict:
    """Test episodes ``start..start+count`` as evaluation draws them."""
    source = make_tasks(shards, "test", TaskSpec(n_way, k_shot, q_query, rotate=False), seed=seed)
    return source.batch(0, range(start, start + count))


def class_name(label: int) -> str:
    return f"class{label:02d}"  # sorts as the labels do


def write_images(folder: Path, images: torch.Tensor, labels: torch.Tensor, *,
                 inverted: bool) -> None:
    """Images of one episode (float [n, C, H, W] in [0, 1]) as PNG files in class folders;
    ``inverted``: as Omniglot's source drawings are (dark strokes), which its packer inverts."""
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        if inverted:
            pixels = 255 - pixels
        target = folder / class_name(label)
        target.mkdir(parents=True, exist_ok=True)
        array = pixels[0] if pixels.shape[0] == 1 else np.transpose(pixels, (1, 2, 0))
        Image.fromarray(array).save(target / f"{i:03d}.png")


def write_episode(folder: Path, tasks: dict, index: int, *, inverted: bool) -> tuple[Path, Path]:
    support, query = folder / "support", folder / "query"
    write_images(support, tasks["support_x"][index], tasks["support_y"][index], inverted=inverted)
    write_images(query, tasks["query_x"][index], tasks["query_y"][index], inverted=inverted)
    return support, query
