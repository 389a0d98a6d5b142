"""Pack a few-shot data set into WebDataset shards with a manifest.

    python launch/pack.py omniglot --source ../shared/data/omniglot --split futurama \\
        --out shards/omniglot-futurama
    python launch/pack.py folder data/my-images --out shards/my-folder --size 84 --channels 3
    python launch/pack.py miniimagenet data/mini-imagenet --out shards/miniimagenet

What each data set expects and how images are resized: `--help` and fsl_dist/data/pack_cli.py.
"""

import sys

from fsl_dist.data.pack_cli import main

if __name__ == "__main__":
    sys.exit(main())
