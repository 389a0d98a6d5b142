"""Pack a few-shot data set into WebDataset shards with a manifest.

    python launch/pack.py omniglot --source ../shared/data/omniglot --split futurama \\
        --out shards/omniglot-futurama

Without --source the official zips are taken from the cache folder ($FSL_DATA_HOME/omniglot or
~/.cache/fsl_dist/omniglot), downloaded there first if missing, and checked against their MD5.
"""

import argparse
import sys

from fsl_dist.data import omniglot, shards


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["omniglot"])
    parser.add_argument("--source", help="folder with images_background.zip and "
                        "images_evaluation.zip (or their extracted folders); "
                        "default: cache + download")
    parser.add_argument("--split", required=True, choices=omniglot.SPLITS)
    parser.add_argument("--out", required=True, help="shard set folder to create or replace")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    parser.add_argument("--classes-per-shard", type=int, default=shards.DEFAULT_CLASSES_PER_SHARD)
    parser.add_argument("--seed", type=int, default=0, help="seed of the class split (default 0)")
    parser.add_argument("--no-download", action="store_true", help="never download; fail instead")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = shards.pack_omniglot(args.source, args.split, args.out, size=args.size,
                                   classes_per_shard=args.classes_per_shard, seed=args.seed,
                                   download=not args.no_download)
    except ValueError as error:  # OmniglotSourceError, ShardError and bad values: message says why
        print(f"pack.py: error: {error}", file=sys.stderr)
        return 2
    manifest = shards.load_manifest(out)
    counts = ", ".join(f"{part} {manifest['splits'][part]['classes']} classes / "
                       f"{len(manifest['splits'][part]['shards'])} shards"
                       for part in omniglot.PARTS)
    print(f"packed omniglot split {args.split!r} at {args.size}x{args.size} into {out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
