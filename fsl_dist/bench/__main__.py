"""``python -m fsl_dist.bench``: launch/bench.py's command line (and each row's process)."""

from .cli import main

main()
