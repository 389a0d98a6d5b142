"""Is bf16 (or float32) close enough for this run's meta-gradient? Measure it before switching.

    python launch/precision_check.py --config configs/cnn_maml.yaml --inner-steps 1,5
    python launch/precision_check.py --run-dir runs/cnn_maml-0 --checkpoint latest

(the first at a config's initial weights, the second at a run's trained weights)

On real training tasks of the run's shards, at each number of inner steps asked for, the
meta-gradient (the trainer's `meta_backward`, loop path) in float32 and in bf16 is compared with
the same meta-gradient in float64: cosine similarity and relative error of the whole vector.
The last column is the float64 meta-gradient at weights moved by bf16's rounding (each weight
times 1 + 2^-9 x N(0, 1)) against the unmoved one: when that cosine is low too, the meta-gradient
itself changes more than bf16 can resolve (an ill-conditioned inner loop, as at initialisation
with several inner steps at a large inner step size), and no implementation of bf16 can match
float64 there; when it is high and bf16's is low, bf16 is losing accuracy that is there to keep.
The support-loss column shows whether the inner loop descends at the configured step size: the
mean support loss (float64) before the first inner step and after each one; a loss that rises
or swings is an inner loop that overshoots, where the second-order term amplifies rounding.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from fsl_dist import numerics
from fsl_dist.config import ConfigError, load_config
from fsl_dist.data.episodes import make_tasks
from fsl_dist.data.shards import load_manifest
from fsl_dist.meta import InnerLoopSpec, adapt, inner_parameter_names, meta_backward
from fsl_dist.meta.algorithms import resolve_inner_lr
from fsl_dist.meta.inner import INNER_LOSSES
from fsl_dist.trained import model_inputs, read_trained
from fsl_dist.trainer import build_state, task_spec

BF16_ROUNDING = 2.0 ** -9  # half a unit in the last place of bf16's 8-bit significand


def step_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected positive integers separated by commas, e.g. 1,3,5")
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a YAML config: its initial weights "
                                         "(as launch/train.py makes them)")
    source.add_argument("--run-dir",
                        help="a run folder: its final model, or --checkpoint's weights")
    parser.add_argument("--checkpoint", help="with --run-dir: latest, a step number or a path")
    parser.add_argument("--inner-steps", type=step_counts, default=[1, 3, 5],
                        help="comma-separated inner step counts (default 1,3,5)")
    parser.add_argument("--tasks", type=int, default=8,
                        help="training tasks in the meta-batch (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="which training tasks (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="with --config: dotted overrides")
    return parser.parse_args(argv)


def load_subject(args) -> tuple:
    """(config, model, inner step size, what the weights are) on the CPU."""
    if args.run_dir:
        trained = read_trained(Path(args.run_dir), "cpu", checkpoint=args.checkpoint,
                               with_config=True)
        return trained.cfg, trained.model, trained.learner.inner_lr, str(trained.weights)
    cfg = load_config(args.config, args.overrides)
    inputs = model_inputs(load_manifest(cfg.data.shards))
    state = build_state(cfg, torch.device("cpu"), inputs)
    weights = f"initial weights of {args.config} (seed {cfg.train.seed})"
    return cfg, state.model, state.learner.inner_lr, weights


def training_tasks(cfg, count: int, seed: int) -> dict:
    sampler = make_tasks(cfg.data.shards, "train", task_spec(cfg, "train"), seed=seed)
    return sampler.batch(0, range(count))


def as_float64(model, inner_lr, tasks):
    model = copy.deepcopy(model).double()
    if isinstance(inner_lr, torch.nn.Module):
        inner_lr = copy.deepcopy(inner_lr).double()
    tasks = {k: v.double() if v.is_floating_point() else v for k, v in tasks.items()}
    return model, inner_lr, tasks


def meta_gradient(model, inner_lr, tasks, cfg, steps: int, precision: str) -> torch.Tensor:
    """The trainer's meta-gradient of the model's weights (loop path), flattened, in float64."""
    spec = InnerLoopSpec.from_config(cfg, precision=precision, inner_lr=inner_lr,
                                     inner_steps=steps).replace(vectorize=False)
    backward = lambda: meta_backward(model, tasks, spec, acc_before=False)  # noqa: E731
    return numerics.gradient_of(backward, model.parameters()).double()


def moved(model, relative: float, seed: int):
    """A copy of `model` with every weight multiplied by 1 + relative x N(0, 1)."""
    model = copy.deepcopy(model)
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + relative * torch.randn(p.shape, generator=noise, dtype=p.dtype))
    return model


def agreement(grad: torch.Tensor, truth: torch.Tensor) -> str:
    """``cosine / relative error`` of ``grad`` against ``truth``, as the table prints it."""
    measures = numerics.agreement(grad, truth)
    return f"{measures['cosine']:.4f} / {measures['norm_rel_diff']:.1e}"


def support_losses(model, inner_lr, tasks, cfg, steps: int) -> list[float]:
    """Mean support loss over the tasks before the first inner step and after each of ``steps``
    (the inner loop as the trainer runs it, without the graph the meta-gradient needs)."""
    names = inner_parameter_names(cfg.algorithm.name, model, cfg.algorithm.adapt)
    lrs = {n: lr.detach() if torch.is_tensor(lr) else lr
           for n, lr in resolve_inner_lr(inner_lr, names).items()}
    forward = lambda params, x: torch.func.functional_call(model, params, (x,))  # noqa: E731
    loss_fn = INNER_LOSSES[cfg.algorithm.inner_loss]
    per_task = []
    for x, y in zip(tasks["support_x"], tasks["support_y"]):
        params, losses = {n: p.detach() for n, p in model.named_parameters()}, []
        for _ in range(steps):
            adaptation = adapt(forward, params, x, y, adapted_names=names, lrs=lrs, steps=1,
                               first_order=True, inner_loss=cfg.algorithm.inner_loss)
            params = {n: p.detach() for n, p in adaptation.params.items()}
            losses.append(adaptation.first_loss.item())
        with torch.no_grad():
            losses.append(loss_fn(forward(params, x), y).item())
        per_task.append(losses)
    return [sum(column) / len(column) for column in zip(*per_task)]


def row(model, inner_lr, tasks, cfg, steps: int) -> str:
    model64, lr64, tasks64 = as_float64(model, inner_lr, tasks)
    truth = meta_gradient(model64, lr64, tasks64, cfg, steps, "no")
    float32 = meta_gradient(model, inner_lr, tasks, cfg, steps, "no")
    bf16 = meta_gradient(model, inner_lr, tasks, cfg, steps, "bf16")
    nearby = meta_gradient(moved(model64, BF16_ROUNDING, seed=1), lr64, tasks64, cfg, steps, "no")
    losses = support_losses(model64, lr64, tasks64, cfg, steps)
    trace = " → ".join(f"{loss:.3g}" for loss in losses)
    return (f"| {steps} | {truth.norm().item():.3g} | {agreement(float32, truth)} | "
            f"{agreement(bf16, truth)} | {agreement(nearby, truth)} | {trace} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg, model, inner_lr, weights = load_subject(args)
        tasks = training_tasks(cfg, args.tasks, args.seed)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    task = cfg.task
    print(f"{cfg.name}: {cfg.algorithm.name} on {cfg.model.name}, {task.n_way}-way "
          f"{task.k_shot}-shot {task.q_query}-query, inner lr {cfg.algorithm.inner_lr}, "
          f"{args.tasks} training tasks (seed {args.seed}), {weights}; cosine / relative error "
          f"against float64\n")
    print("| inner steps | float64 norm | float32 | bf16 | float64 at bf16-rounded weights "
          "| support loss, float64: before → after each step |")
    print("|---|---|---|---|---|---|")
    for steps in args.inner_steps:
        print(row(model, inner_lr, tasks, cfg, steps), flush=True)
    return 0
