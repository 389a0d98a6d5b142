"""Evaluate a trained run folder on held-out episodes: mean query accuracy ± 95% interval.

    python launch/evaluate.py --run-dir runs/cnn_maml-0 --episodes 600
    fsl-evaluate --run-dir runs/cnn_maml-0 --episodes 600                 # installed
    accelerate launch --multi_gpu --num_processes 2 launch/evaluate.py --run-dir runs/cnn_maml-0 --inner-steps 5
    python launch/evaluate.py --run-dir runs/cnn_maml-0 --part val --checkpoint 2500   # a kept checkpoint
    python launch/evaluate.py --run-dir runs/cnn_maml-0 --seeds 1234 1235 1236 1237 1238
    python launch/evaluate.py --run-dir runs/mamlpp-0 --queries 15   # trained with 1 query per class
    python launch/evaluate.py --run-dir runs/omniglot_cnn-0 --method finetune-cosine   # Baseline++
    python launch/evaluate.py --run-dir runs/protonet-0 --test-shift 1   # features of 5 shifted copies

--method adapt (default) adapts as the run was trained (its inner loop; a pre-trained run of
fsl-pretrain: nearest centroid, as it was validated); the others read only the frozen body, for
any trained run: centroid (nearest class mean of the support features), finetune-linear
(Baseline) and finetune-cosine (Baseline++): a new head trained on the support features with
Chen et al. 2019's settings (fsl_dist/finetune.py).

With several --seeds, each seed draws its own --episodes and the result states the seeds' means,
their spread and the larger of the two intervals (over episodes, over seeds): on a small test
part one seed's interval understates the uncertainty.

Episodes are divided among processes and gathered; the JSON goes to the run folder.
"""  # noqa: E501 (the --help text)

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from fsl_dist.config import ConfigError
from fsl_dist.cpu_malloc import tune_cpu_malloc
from fsl_dist.distributed import Distributed, launcher_precision
from fsl_dist.exits import exit_code, report
from fsl_dist.finetune import METHODS
from fsl_dist.io import WriteFailure, check_writable
from fsl_dist.resume import describe
from fsl_dist.runs import evaluate_held_out
from fsl_dist.signals import leave
from fsl_dist.trained import is_pretrained, read_trained
from fsl_dist.trainer import resolve_precision


def whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
    return value


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1 (0 episodes or inner steps is a mistake, not
    "the default")."""
    return whole_number(text, 1)


def non_negative(text: str) -> int:
    """argparse type: a whole number of at least 0."""
    return whole_number(text, 0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a run folder written by launch/train.py")
    parser.add_argument("--episodes", type=positive,
                        help="episodes (default: the config's eval.episodes)")
    parser.add_argument("--ways", type=positive,
                        help="N-way (default: eval.n_way, else task.n_way); a model with a head "
                             "(the MAML family) takes only its trained N")
    parser.add_argument("--shots", type=positive, help="K-shot (default: the trained K)")
    parser.add_argument("--queries", type=positive,
                        help="query images per class (default: the trained Q); one Q for runs "
                             "trained with different ones")
    parser.add_argument("--part", choices=("val", "test"), help="split part (default: eval.part)")
    parser.add_argument("--inner-steps", type=positive,
                        help="inner steps at test time (default: eval.inner_steps)")
    parser.add_argument("--method", choices=("adapt",) + METHODS, default="adapt",
                        help="adapt (the trained inner loop, a pre-trained run's nearest "
                        "centroid; default), or on the frozen body: centroid, finetune-linear "
                        "(Baseline), finetune-cosine (Baseline++)")
    parser.add_argument("--test-shift", type=non_negative,
                        help="test-time shifts of protonet and ridge: features averaged over "
                        "each image's copies shifted by up to this many pixels (1: 5 copies, "
                        "2: 13; 0: off; default: the model's eval.test_shift)")
    parser.add_argument("--checkpoint", help="evaluate a training checkpoint instead of the final "
                        "model: latest, a step number, or a path (default: model.safetensors)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="episode seeds (default: the config's eval.seed); two or more report "
                             "the mean over seeds with the between-seed spread")
    parser.add_argument("--out", default=None,
                        help="file name in the run folder (default eval-<part>.json; another "
                        "--method, or a pre-trained run: eval-<part>-<method>.json)")
    parser.add_argument("--traceback", action="store_true",
                        help="show the traceback of expected failures too")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress (a bar on a terminal, plain lines in a log)")
    return parser.parse_args(argv)


def own_method(method: str, description: dict) -> str:
    """The method evaluated: a pre-trained model (fsl-pretrain) adapts by nearest centroid, as
    it was validated and as fsl-predict classifies, so ``adapt`` evaluates it by ``centroid``
    (the frozen-body method itself, to the bit)."""
    return "centroid" if method == "adapt" and is_pretrained(description) else method


def use_test_shift(learner, shift: int, method: str) -> None:
    """``--test-shift``: only where features are averaged (protonet, ridge adapting as trained)."""
    if method != "adapt" or not hasattr(learner, "test_shift"):
        raise ConfigError(f"--test-shift {shift}: test-time shifts average the features of "
                          "protonet and ridge models evaluated as trained (--method adapt); "
                          "this evaluation fits no such head: leave --test-shift out")
    learner.test_shift = shift


def summary_line(result: dict) -> str:
    method = "" if result.get("method", "adapt") == "adapt" else f" ({result['method']})"
    line = progress_note(result) + (f"{result['part']} accuracy{method} {result['mean']:.2f} ± "
                                    f"{result['ci95']:.2f}% over {result['episodes']} episodes")
    if "seed_means" in result:
        means = ", ".join(f"{m:.2f}" for m in result["seed_means"])
        line += (f" from {len(result['seeds'])} seeds (seed means {means}; between-seed std "
                 f"{result['seed_std']:.2f}; interval lower end {result['low']:.2f})")
    return line


def progress_note(result: dict) -> str:
    """ "model of step 187 of 2000 (training stopped early): " when it did, "(the run is still
    training)" while a trainer holds the run folder, else ""."""
    done, planned = result.get("trained_steps"), result.get("planned_steps")
    if done is None or planned is None:
        return ""
    if result.get("training_in_progress"):
        return f"model of step {done} of {planned} (the run is still training): "
    if done >= planned:
        return ""
    return f"model of step {done} of {planned} (training stopped early): "


def changes_note(result: dict) -> str:
    """A line naming the config changes of the run's resumes (run.json), or ""."""
    if not result.get("config_changes"):
        return ""
    return ("note: the config changed while this model trained: "
            f"{describe(result['config_changes'])} (run.json)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out is not None and Path(args.out).name != args.out:
        # --out is a name inside the run folder; a path would land nested under it, found by no one
        print(f"error: --out {args.out}: give a file name only; the result is written in the run "
              f"folder {args.run_dir} (e.g. --out {Path(args.out).name})", file=sys.stderr)
        return 2
    dist = Distributed()
    try:
        trained = read_trained(Path(args.run_dir), dist.device, checkpoint=args.checkpoint,
                               with_config=True)
        cfg = trained.cfg
        part = args.part or cfg.eval.part
        method = own_method(args.method, trained.description)
        out_name = args.out or f"eval-{part}{'' if method == 'adapt' else '-' + method}.json"
        # Before the evaluation, not after it: a run folder this user (or a read-only mount)
        # cannot write would cost the whole evaluation.
        dist.on_main(lambda: check_writable(Path(args.run_dir) / out_name), (WriteFailure,))
        if dist.device.type == "cpu" and cfg.train.tune_cpu_malloc:
            outcome = tune_cpu_malloc()
            if outcome != "tuned":  # the usual outcome goes unsaid (as in the trainer)
                dist.print(f"cpu malloc: {outcome}", file=sys.stderr)
        if args.test_shift is not None:
            use_test_shift(trained.learner, args.test_shift, method)
        adapts = method == "adapt" and trained.learner.fixed_way  # the trained head's N
        if args.ways is not None and args.ways != cfg.evaluation_way():
            if adapts:
                raise ConfigError(f"--ways {args.ways}: the model in {args.run_dir} has a "
                                  f"{cfg.task.n_way}-way head; evaluate with its N-way, with a "
                                  "--method on its frozen body, or train a model for this N")
            cfg.eval.n_way = args.ways  # no head fixes N (protonet; a new head per episode)
        precision = resolve_precision(cfg.precision, launcher_precision(), dist.device)
        result = evaluate_held_out(trained.learner, cfg, dist, Path(args.run_dir),
                                   precision=precision, episodes=args.episodes, shots=args.shots,
                                   queries=args.queries, part=part,
                                   inner_steps=args.inner_steps, out_name=out_name,
                                   weights=trained.weights, seeds=args.seeds,
                                   quiet=args.quiet, method=method)
    except Exception as err:
        code = exit_code(err)
        if code is None or args.traceback:
            raise
        report(err, dist)
        return dist.exit(code)
    dist.print(json.dumps(result, indent=2))
    dist.print(summary_line(result), file=sys.stderr)
    if changes_note(result):
        dist.print(changes_note(result), file=sys.stderr)
    dist.print(f"wrote {Path(args.run_dir) / out_name}", file=sys.stderr)
    dist.end()
    return dist.exit(0)


def command() -> NoReturn:
    """`fsl-evaluate`: main(), then the end of the process (signals.leave says why)."""
    leave(main())


if __name__ == "__main__":
    command()
