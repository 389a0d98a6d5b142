"""Pack a few-shot data set into WebDataset shards with a manifest.

    python launch/pack.py omniglot --source ../shared/data/omniglot --split futurama \\
        --out shards/omniglot-futurama
    python launch/pack.py folder data/my-images --out shards/my-folder --size 84 --channels 3
    python launch/pack.py miniimagenet data/mini-imagenet --out shards/miniimagenet

omniglot: without --source the official zips are taken from the cache folder
($FSL_DATA_HOME/omniglot or ~/.cache/fsl_dist/omniglot), downloaded there first if missing, and
checked against their MD5. folder: ROOT/<class>/<image>, any format Pillow opens; the shorter
side is resized to --size, then the centre square is cropped (see fsl_dist/data/folder.py).
miniimagenet, tieredimagenet, cifarfs, fc100, cub: the standard benchmarks from local copies of
their usual layouts, checked against their known class counts (see fsl_dist/data/benchmarks.py).
"""

import argparse
import sys

from fsl_dist.data import benchmarks, folder, omniglot, shards
from fsl_dist.exits import exit_code
from fsl_dist.io import WriteFailure


def fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers, "
                                         "e.g. 0.64,0.16,0.20") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    datasets = parser.add_subparsers(dest="dataset", required=True)
    omni = datasets.add_parser("omniglot", help="Omniglot, by named split")
    omni.add_argument("--source", help="folder with images_background.zip and "
                      "images_evaluation.zip (or their extracted folders); "
                      "default: cache + download")
    omni.add_argument("--split", required=True, choices=omniglot.SPLITS)
    omni.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    omni.add_argument("--no-download", action="store_true", help="never download; fail instead")
    images = datasets.add_parser("folder", help="an image folder ROOT/<class>/<image>")
    images.add_argument("root", help="folder holding one folder of images per class")
    split = images.add_mutually_exclusive_group()
    split.add_argument("--split-file", help='JSON {"train": [classes], "val": [...], '
                       '"test": [...]} or CSV rows class,part')
    split.add_argument("--fractions", type=fractions, default=folder.DEFAULT_FRACTIONS,
                       help="seeded class fractions train,val,test (default 0.64,0.16,0.20)")
    images.add_argument("--size", type=int, default=folder.DEFAULT_SIZE,
                        help=f"image side in pixels (default {folder.DEFAULT_SIZE})")
    images.add_argument("--channels", type=int, choices=(1, 3),
                        help="convert every image to 1 (grayscale) or 3 (RGB) channels; "
                        "needed when the images mix them")
    subs = [omni, images]
    for name, benchmark in benchmarks.BENCHMARKS.items():
        sub = datasets.add_parser(name, help=f"{name}: {benchmark.layout}",
                                  description=f"Expects {benchmark.layout}; published by "
                                  f"{benchmark.published}.")
        sub.add_argument("root", help=f"the local copy: {benchmark.layout}")
        sub.add_argument("--size", type=int, default=benchmark.size,
                         help=f"image side in pixels (default {benchmark.size})")
        sub.add_argument("--channels", type=int, choices=(1, 3), default=3,
                         help="1 (grayscale) or 3 (RGB, default)")
        subs.append(sub)
    for sub in subs:
        sub.add_argument("--out", required=True,
                         help="folder for the shard set: new, empty, or holding a shard set "
                         "(then replaced); any other folder is refused, never emptied")
        sub.add_argument("--classes-per-shard", type=int,
                         default=shards.DEFAULT_CLASSES_PER_SHARD)
        sub.add_argument("--quiet", action="store_true",
                         help="no progress (a bar on a terminal, plain lines in a log)")
    for sub in (omni, images):  # the benchmarks' splits are fixed
        sub.add_argument("--seed", type=int, default=0, help="seed of the class split (default 0)")
    return parser.parse_args(argv)


def pack(args: argparse.Namespace):
    if args.dataset == "omniglot":
        return shards.pack_omniglot(args.source, args.split, args.out, size=args.size,
                                    classes_per_shard=args.classes_per_shard, seed=args.seed,
                                    download=not args.no_download, quiet=args.quiet)
    if args.dataset in benchmarks.BENCHMARKS:  # always checked against the real counts
        return benchmarks.pack_benchmark(args.dataset, args.root, args.out, size=args.size,
                                         channels=args.channels,
                                         classes_per_shard=args.classes_per_shard,
                                         quiet=args.quiet)
    return folder.pack_folder(args.root, args.out, size=args.size, channels=args.channels,
                              split_file=args.split_file, fractions=args.fractions,
                              seed=args.seed, classes_per_shard=args.classes_per_shard,
                              quiet=args.quiet)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = pack(args)
    except WriteFailure as error:  # no space, no permission, read-only, a file in the path
        print(f"error: {error}", file=sys.stderr)
        return exit_code(error)
    except ValueError as error:  # source, split, shard errors and bad values: message says why
        print(f"error: {error}", file=sys.stderr)
        return 2
    manifest = shards.load_manifest(out)
    counts = ", ".join(f"{part} {manifest['splits'][part]['classes']} classes / "
                       f"{len(manifest['splits'][part]['shards'])} shards"
                       for part in shards.PARTS)
    size = manifest["image_size"]
    what = (f"omniglot split {args.split!r} at {size}x{size}" if args.dataset == "omniglot"
            else f"{args.root} at {size}x{size} with {manifest['channels']} channels")
    print(f"packed {what} into {out}: {counts}")
    return 0
