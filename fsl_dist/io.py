"""Atomic file writes: write to a temporary name in the same folder, then rename into place, so
a crash or a kill never leaves a half-written file where a good one was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

# Below this much free space after a failed write, a writer's error is taken for a full disk:
# torch.save reports one as "file write failed" or "basic_ios::clear: iostream error".
NEARLY_FULL = 64 * 2**20


class DiskFullError(Exception):
    """A write failed for lack of space; the message names the file and the free space."""


def free_space_note(folder: Path) -> str:
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)} there"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def _disk_full(path: Path) -> DiskFullError:
    return DiskFullError(f"no space left on the device writing {path} "
                         f"({free_space_note(path.parent)}); free some space and run again "
                         "(training continues with --resume auto)")


def _out_of_space(err: BaseException, folder: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, Exception):
        try:  # torch's and safetensors' writers do not always say why: full if little is left
            return shutil.disk_usage(folder).free < NEARLY_FULL
        except OSError:
            return False
    return False


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename tmp_path to `path` (same filesystem, so atomic). A
    write that fails for lack of space raises ``DiskFullError``; either way the temporary file
    is removed and whatever was at `path` stays as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if _out_of_space(err, path.parent):
            raise _disk_full(path) from None
        raise


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline, whole or not at all: a failed write is cut back off, so
    the file never ends in half a line. Lack of space raises ``DiskFullError``."""
    path = Path(path)
    with open(path, "a") as fh:
        start = fh.tell()
        try:
            fh.write(line + "\n")
            fh.flush()
        except OSError as err:
            fh.truncate(start)
            if _out_of_space(err, path.parent):
                raise _disk_full(path) from None
            raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
