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

import sys

from fsl_dist.data.pack_cli import main

if __name__ == "__main__":
    sys.exit(main())
