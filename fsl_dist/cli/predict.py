"""Adapt a trained model to labelled images and classify new ones.

    fsl-predict --model runs/cnn_maml-0 --support my-support --query my-query --out labels.csv
    python -m fsl_dist.cli.predict --model export/ --support my-support --query a.png b.png

--support holds one folder per class (the folder names are the labels, N of them for an N-way
model). --query is a folder (every image under it; when its images sit in folders named after
the support classes, those are taken as their true classes and the accuracy is printed) or image
files. --out writes CSV or JSON by its extension: each image's file, predicted class and the
probability of every class. Images go through the preprocessing the model was trained with.
A pre-trained backbone (fsl-pretrain) takes any number of classes and classifies by nearest
centroid (the class means of the support features), as fsl-evaluate --method centroid.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import NoReturn

from fsl_dist.data.folder import FolderSourceError, list_classes
from fsl_dist.exits import EXIT_BAD_INPUT, exit_code, report
from fsl_dist.io import atomic_write_text, check_writable
from fsl_dist.predict import PredictError, Prediction, load_model
from fsl_dist.signals import leave
from fsl_dist.trained import is_pretrained

FORMATS = (".csv", ".json")
SHOWN_ROWS = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fsl-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a run folder, or a folder holding model.safetensors and model.yaml")
    parser.add_argument("--support", required=True, type=Path,
                        help="folder of class folders of labelled images")
    parser.add_argument("--query", required=True, nargs="+", type=Path,
                        help="a folder of images (searched recursively) or image files")
    parser.add_argument("--out", type=Path, help="write the predictions here (.csv or .json)")
    parser.add_argument("--convert", action="store_true",
                        help="convert images to the model's channel count instead of refusing "
                             "them")
    parser.add_argument("--batch-size", type=int,
                        help="query images scored together (default: all; batch norm uses the "
                             "batch's statistics, as evaluation does with a query set)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    parser.add_argument("--quiet", action="store_true",
                        help="no table on stdout and no progress (a bar on a terminal, plain "
                             "lines in a log)")
    parser.add_argument("--traceback", action="store_true",
                        help="show the traceback of expected failures too")
    return parser.parse_args(argv)


def query_files(paths: list[Path]) -> list[Path]:
    """The query images: the given files, and every non-hidden file under given folders."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise PredictError(f"query folder {path} holds no images")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PredictError(f"query {path} does not exist")
    return files


def true_classes(files: list[Path], roots: list[Path], classes: tuple) -> list | None:
    """The class of each query image when every one sits in a folder named after a support
    class directly under the given query folder, else None."""
    if len(roots) != 1 or not roots[0].is_dir():
        return None
    names = [f.relative_to(roots[0]).parts for f in files]
    if any(len(parts) != 2 or parts[0] not in classes for parts in names):
        return None
    return [parts[0] for parts in names]


def rows_of(files: list[Path], prediction: Prediction, truth: list | None) -> list[dict]:
    rows = []
    for i, path in enumerate(files):
        row = {"file": str(path), "predicted": prediction.labels[i],
               "probability": float(prediction.probabilities[i, prediction.indices[i]])}
        if truth is not None:
            row["true"] = truth[i]
        row["probabilities"] = {c: float(p) for c, p in zip(prediction.classes,
                                                             prediction.probabilities[i].tolist())}
        rows.append(row)
    return rows


def as_csv(rows: list[dict], classes: tuple) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    extra = ["true"] if rows and "true" in rows[0] else []
    writer.writerow(["file", "predicted", *extra, *(f"p_{c}" for c in classes)])
    for row in rows:
        writer.writerow([row["file"], row["predicted"], *(row[k] for k in extra),
                         *(repr(row["probabilities"][c]) for c in classes)])
    return text.getvalue()


def as_json(rows: list[dict], classes: tuple, summary: dict) -> str:
    return json.dumps({**summary, "classes": list(classes), "predictions": rows}, indent=1) + "\n"


def shown_name(file: str, roots: list[Path]) -> str:
    """A query image as the table shows it: relative to the one query folder given (so that
    a/q2.png and b/q2.png differ), else as given."""
    if len(roots) == 1 and roots[0].is_dir() and Path(file).is_relative_to(roots[0]):
        return Path(file).relative_to(roots[0]).as_posix()
    return file


def table(rows: list[dict], roots: list[Path]) -> str:
    names = [shown_name(r["file"], roots) for r in rows[:SHOWN_ROWS]]
    width = max(len(name) for name in names)
    truth = "true" in rows[0]
    lines = [f"{'file':<{width}}  {'predicted':<12} " + (f"{'true':<12} " if truth else "")
             + "probability"]
    lines += [f"{name:<{width}}  {str(r['predicted']):<12} "
              + (f"{str(r['true']):<12} " if truth else "") + f"{r['probability']:.3f}"
              for name, r in zip(names, rows)]
    if len(rows) > SHOWN_ROWS:
        lines.append(f"... {len(rows) - SHOWN_ROWS} more")
    return "\n".join(lines)


def accuracy(rows: list[dict]) -> float | None:
    if not rows or "true" not in rows[0]:
        return None
    return 100.0 * sum(r["predicted"] == r["true"] for r in rows) / len(rows)


def stopped_note(description: dict) -> str | None:
    """A line for a model whose training stopped before its planned steps (model.yaml records
    both), else None."""
    done, planned = description.get("step"), description.get("planned_steps")
    if done is None or planned is None or done >= planned:
        return None
    return f"note: the model is of step {done} of {planned} (its training stopped early)"


def pretrained_note(description: dict) -> str | None:
    """A line for a pre-trained model (fsl-pretrain), which classifies by nearest centroid,
    else None."""
    if not is_pretrained(description):
        return None
    return (f"note: a pre-trained backbone (its head over {description['pretrained']['classes']} "
            "training classes unused): each image goes to the nearest class mean of the support "
            "features, as fsl-evaluate --method centroid scores it")


def predict_folders(args: argparse.Namespace) -> tuple[list[dict], tuple, dict]:
    """(rows, classes, summary) of the command's inputs; nothing is written."""
    if args.out is not None and args.out.suffix.lower() not in FORMATS:
        raise PredictError(f"--out {args.out}: name a .csv or .json file")
    if args.out is not None:
        check_writable(args.out)  # before the work, not after the predictions are printed
    model = load_model(args.model, args.device)
    for note in (stopped_note(model.description), pretrained_note(model.description)):
        if note:
            print(note, file=sys.stderr)
    support = list_classes(args.support)
    images = [path for cls in support for path in cls.files]
    labels = [cls.name for cls in support for _ in cls.files]
    files = query_files(args.query)
    classifier = model.adapt(images, labels, convert=args.convert)
    prediction = classifier.predict(files, batch_size=args.batch_size, convert=args.convert,
                                    quiet=args.quiet)
    rows = rows_of(files, prediction, true_classes(files, args.query, classifier.classes))
    summary = {"model": str(args.model), "support": str(args.support), "images": len(rows),
               "inner_steps": model.learner.evaluation_steps,
               "algorithm": model.description["algorithm"]["name"],
               "accuracy": accuracy(rows)}
    return rows, classifier.classes, summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows, classes, summary = predict_folders(args)
        if args.out is not None:
            text = (as_json(rows, classes, summary) if args.out.suffix.lower() == ".json"
                    else as_csv(rows, classes))
            atomic_write_text(args.out, text)
    except (PredictError, FolderSourceError) as err:
        if args.traceback:
            raise
        report(err)
        return EXIT_BAD_INPUT
    except Exception as err:
        code = exit_code(err)
        if code is None or args.traceback:
            raise
        report(err)
        return code
    if not args.quiet:
        print(table(rows, args.query))
    line = f"{len(rows)} images, {len(classes)} classes ({', '.join(map(str, classes))})"
    if summary["accuracy"] is not None:
        line += f", accuracy {summary['accuracy']:.2f}% against their folders"
    print(line + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def command() -> NoReturn:
    """`fsl-predict`: main(), then the end of the process (signals.leave says why)."""
    leave(main())


if __name__ == "__main__":
    command()
