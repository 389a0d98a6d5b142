"""Progress bars that stay out of logs: shown on a terminal, silent when stderr is a file or a
pipe (SLURM output, CI, `2> log`), and silent on request (`--quiet`).

    for batch in progress(batches, desc="predicting", quiet=args.quiet or not dist.is_main):
        ...
    with progress(total=episodes, desc="evaluating", unit="ep", quiet=quiet) as bar:
        bar.update(n)

In distributed code pass `quiet=... or not dist.is_main`: one bar per job, not one per rank.
"""

from __future__ import annotations

from typing import Iterable, Optional

from tqdm import tqdm


def progress(iterable: Optional[Iterable] = None, *, desc: Optional[str] = None,
             total: Optional[int] = None, quiet: bool = False, **options) -> tqdm:
    """A tqdm bar over `iterable` (or counting to `total`), written to stderr.

    Disabled when `quiet`, and when stderr is not a terminal (tqdm's `disable=None` asks
    stderr's isatty() as the bar is made). `options` go to tqdm (`unit`, `leave`, ...)."""
    return tqdm(iterable, desc=desc, total=total, disable=True if quiet else None,
                dynamic_ncols=True, **options)
