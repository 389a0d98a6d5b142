"""Benchmark prediction: how fast a trained model adapts to a support set and classifies.

    python launch/bench_predict.py                      # the four default cases, 5 s each
    python launch/bench_predict.py --json runs/bench_predict.json --seconds 10

Each case is a config's model, exported by training's own export code (freshly initialised
weights: speed does not depend on their values) and loaded back with ``fsl_dist.predict``, so the
rows time what `fsl-predict` and the API run: the config's test-time inner steps, its algorithm,
one N-way K-shot support set. Columns: milliseconds to adapt, then query images per second
after adaptation, for batches of evaluation's query-set size and of one image (tensors, already
preprocessed), and for the query-set batch read from PNG files (decoding and preprocessing
included). Prints the machine line, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsl_dist.bench.machine import cpu_description
from fsl_dist.config import load_config
from fsl_dist.predict import load_model
from fsl_dist.trained import build_run_model, write_trained

ROOT = Path(__file__).resolve().parents[2]
# (config, the data its model is for: dataset, channels, side)
CASES = {
    "cnn_maml": ("configs/cnn_maml.yaml", "omniglot", 1, 28),
    "resnet_boil": ("configs/resnet_boil.yaml", "omniglot", 1, 28),
    "miniimagenet/cnn_maml_5w5s": ("configs/miniimagenet/cnn_maml_5w5s.yaml", "miniimagenet",
                                   3, 84),
    "miniimagenet/resnet_boil_5w5s": ("configs/miniimagenet/resnet_boil_5w5s.yaml",
                                      "miniimagenet", 3, 84),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args(argv)


def exported_model(case: str, folder: Path, device: str):
    config, dataset, channels, side = CASES[case]
    cfg = load_config(ROOT / config)
    manifest = {"dataset": dataset, "split": None, "channels": channels, "image_size": side,
                "format_version": 2}
    torch.manual_seed(0)
    model = build_run_model(cfg, {"in_channels": channels, "image_size": side})
    write_trained(folder, model, cfg, manifest)
    return load_model(folder, device), cfg


def timed(fn, seconds: float) -> tuple[float, int]:
    """Seconds per call of ``fn`` (after one warm-up call) and the calls timed."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls, calls


def png_files(folder: Path, images: torch.Tensor) -> list[Path]:
    folder.mkdir()
    paths = []
    for i, image in enumerate((images * 255).round().to(torch.uint8).numpy()):
        array = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def measure(case: str, args, scratch: Path) -> dict:
    model, cfg = exported_model(case, scratch / "model", args.device)
    n, k, q = cfg.task.n_way, cfg.task.k_shot, cfg.task.q_query
    _, _, channels, side = CASES[case]
    generator = torch.Generator().manual_seed(0)
    support = torch.rand(n * k, channels, side, side, generator=generator)
    labels = torch.arange(n).repeat_interleave(k)
    query = torch.rand(n * q, channels, side, side, generator=generator)
    adapt_s, adapt_calls = timed(lambda: model.adapt(support, labels), args.seconds)
    classifier = model.adapt(support, labels)
    batch_s, batch_calls = timed(lambda: classifier.predict(query), args.seconds)
    one_s, _ = timed(lambda: classifier.predict(query[:1]), args.seconds)
    files = png_files(scratch / "query", query)
    files_s, _ = timed(lambda: classifier.predict(files), args.seconds)
    return {"case": case, "model": f"{cfg.model.name}-{cfg.model.width}",
            "algorithm": cfg.algorithm.name, "image": f"{side}x{side}x{channels}",
            "task": f"{n}-way {k}-shot", "inner_steps": model.learner.evaluation_steps,
            "adapt_ms": 1000 * adapt_s, "adapt_calls": adapt_calls, "query_batch": n * q,
            "images_per_s": n * q / batch_s, "batch_calls": batch_calls,
            "images_per_s_one": 1 / one_s, "images_per_s_png": n * q / files_s}


def table(rows: list[dict]) -> str:
    lines = ["| config | model | image | support | inner steps | adapt ms | images/s, "
             "query-set batch | images/s, one image | images/s, query-set batch from PNG |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['model']} ({r['algorithm']}) | {r['image']} | "
                     f"{r['task']} | {r['inner_steps']} | {r['adapt_ms']:.1f} | "
                     f"{r['images_per_s']:.0f} ({r['query_batch']}) | "
                     f"{r['images_per_s_one']:.0f} | {r['images_per_s_png']:.0f} |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    """The machine line (the allocator as the process found it: prediction does not tune it)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    return (f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python "
            f"{platform.python_version()}, device {device.type}, "
            f"{torch.get_num_threads()} threads")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(f"machine: {machine(device)}")
    print(f"{args.seconds:g} s per measurement, after one warm-up call\n")
    rows = []
    for case in args.cases:
        with tempfile.TemporaryDirectory() as scratch:
            rows.append(measure(case, args, Path(scratch)))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(device),
                                         "seconds": args.seconds, "rows": rows}, indent=1))
