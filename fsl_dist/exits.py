"""Exit codes of the entry points, and which failures a user can cause.

A failure a user can cause (bad config or data, a busy or occupied run folder, an unreadable
checkpoint, a folder that is full, read-only or not writable by this user, a diverging run) ends
in one line on stderr and its exit code; any other exception is a bug and keeps its traceback.
``--traceback`` shows the traceback of expected failures too.
"""

from __future__ import annotations

import sys

from fsl_dist.checkpoint import CheckpointError
from fsl_dist.config import ConfigError
from fsl_dist.data.shards import ShardError
from fsl_dist.io import DiskFullError, NotAFolderError, ReadOnlyError, WriteDeniedError
from fsl_dist.memory_plan import MemoryPlanError
from fsl_dist.runfolder import RunFolderError
from fsl_dist.slurm import EXIT_RESUMABLE
from fsl_dist.trained import TrainedModelError

EXIT_OK = 0
EXIT_BUG = 1  # Python's own code for an uncaught exception
EXIT_BAD_INPUT = 2  # config, data, run folder, checkpoint: fix the input and run again
EXIT_DIVERGED = 3  # non-finite steps kept coming: lower a rate
EXIT_NO_PLAN = 4  # train.memory_budget_gb: no plan's measured peak fits; raise it
EXIT_READ_ONLY = 73  # sysexits' EX_CANTCREAT: a read-only file system; write elsewhere
EXIT_NO_SPACE = 74  # sysexits' EX_IOERR: free space, then --resume auto
EXIT_DENIED = 77  # sysexits' EX_NOPERM: this user may not write there
EXIT_STOPPED = EXIT_RESUMABLE  # 75: stopped by a signal at a checkpoint; --resume auto continues

EXPECTED = {
    ConfigError: EXIT_BAD_INPUT,
    ShardError: EXIT_BAD_INPUT,
    RunFolderError: EXIT_BAD_INPUT,
    CheckpointError: EXIT_BAD_INPUT,
    FileNotFoundError: EXIT_BAD_INPUT,
    TrainedModelError: EXIT_BAD_INPUT,
    MemoryPlanError: EXIT_NO_PLAN,
    # Write failures, by errno (fsl_dist/io.py); a file where a folder should be is a wrong path.
    DiskFullError: EXIT_NO_SPACE,
    WriteDeniedError: EXIT_DENIED,
    ReadOnlyError: EXIT_READ_ONLY,
    NotAFolderError: EXIT_BAD_INPUT,
}


def exit_code(err: BaseException) -> int | None:
    """The exit code of an expected failure, None for a bug."""
    for kind, code in EXPECTED.items():
        if isinstance(err, kind):
            return code
    return None


def report(err: BaseException, dist=None) -> None:
    """The one line of an expected failure; a failure of the main rank that every rank raised
    (``Distributed.on_main``) is said by the main rank only."""
    if dist is not None and getattr(err, "raised_on_main", False) and not dist.is_main:
        return
    print(f"error: {err}", file=sys.stderr, flush=True)
