"""Atomic file writes, and write failures told apart by their cause.

A file is written to a temporary name in the same folder, then renamed into place, so a crash or
a kill never leaves a half-written file where a good one was. A write that fails for a reason
the user can fix (no space, no permission, a read-only file system, a file where a folder
should be) raises a ``WriteFailure`` whose message names the path and what to do; each kind has
its own exit code (fsl_dist/exits.py). The kind comes from the errno; free space decides only
when a writer hid the errno (torch.save says "file write failed").
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

# Below this much free space after a failed write that gave no errno, it is taken for a full
# disk: torch.save reports one as "file write failed" or "basic_ios::clear: iostream error".
NEARLY_FULL = 64 * 2**20


class WriteFailure(Exception):
    """A file or folder could not be written; the message names the path and what to do."""


class DiskFullError(WriteFailure):
    """No space left (ENOSPC) or over a quota (EDQUOT)."""


class WriteDeniedError(WriteFailure):
    """This user may not write there (EACCES, EPERM)."""


class ReadOnlyError(WriteFailure):
    """The file system is mounted read-only (EROFS)."""


class NotAFolderError(WriteFailure):
    """A component of the path is a file, not a folder (ENOTDIR, or EEXIST making a folder)."""


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


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as a file or a folder)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _file_in_the_way(path: Path, err: Optional[BaseException] = None) -> Optional[Path]:
    """The file that stands where a folder of ``path`` should be (the folder ``err`` failed to
    make, or one of ``path``'s parents), if any."""
    made = getattr(err, "filename", None)
    candidates = [Path(os.path.abspath(made))] if isinstance(made, (str, Path)) else []
    for folder in candidates + list(reversed(Path(os.path.abspath(path)).parents)):
        if os.path.lexists(folder) and not folder.is_dir():
            return folder
    return None


def _errno(err: BaseException) -> Optional[int]:
    """The errno of ``err``: an OSError's, or the one Rust writers put in their message
    (safetensors: "I/O error: No space left on device (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err)) if isinstance(err, Exception) else None
    return int(found.group(1)) if found else None


def _kind(err: BaseException, path: Path) -> Optional[type]:
    """Which WriteFailure ``err`` (raised writing ``path``) is, or None."""
    code = _errno(err)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError
    if code in (errno.EACCES, errno.EPERM):
        return WriteDeniedError
    if code == errno.EROFS:
        return ReadOnlyError
    if code in (errno.ENOTDIR, errno.EEXIST):
        return NotAFolderError if _file_in_the_way(path, err) else None
    if code is not None or not isinstance(err, Exception):
        return None  # a known errno of another kind, or a KeyboardInterrupt: not ours to name
    try:  # the writer hid the errno (torch, safetensors): ask the file system
        stats = os.statvfs(_nearest_existing(path.parent))
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return ReadOnlyError
    return DiskFullError if stats.f_bavail * stats.f_frsize < NEARLY_FULL else None


def write_failure(err: BaseException, path: Path) -> Optional[WriteFailure]:
    """The WriteFailure that ``err``, raised writing ``path``, stands for; None when it is none
    of them (an unexpected error keeps its traceback)."""
    path = Path(path)
    kind = _kind(err, path)
    if kind is None:
        return None
    folder = _nearest_existing(path.parent)
    if kind is DiskFullError:
        return kind(f"no space left on the device writing {path} ({free_space_note(folder)}); "
                    "free some space and run again")
    if kind is WriteDeniedError:
        return kind(f"permission denied writing {path}: this user may not write in {folder}; "
                    "give a folder you can write in, or change its permissions")
    if kind is ReadOnlyError:
        return kind(f"cannot write {path}: {folder} is on a read-only file system; give a "
                    "folder on a writable one")
    return kind(f"cannot write {path}: {_file_in_the_way(path, err)} is a file, not a folder; "
                "move that file, or give another path")


@contextmanager
def writing(path: Optional[Path] = None) -> Iterator[None]:
    """Writes to ``path`` inside the block (None: to whatever path the error names): an OSError
    of a known kind becomes its WriteFailure, naming that path; other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        named = path if path is not None or err.filename is None else os.fsdecode(err.filename)
        failure = write_failure(err, Path(named)) if named is not None else None
        if failure is None:
            raise
        raise failure from None


def check_writable(path: Path) -> None:
    """Raise the WriteFailure that writing ``path`` later would meet, before any work is done:
    a probe file is made and removed in its nearest existing folder (os.access alone misses
    read-only mounts)."""
    path = Path(path)
    with writing(path):
        blocker = _file_in_the_way(path)
        if blocker is not None:
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(blocker))
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe",
                                     dir=_nearest_existing(path.parent))
        os.close(fd)
        os.unlink(probe)


def make_folder(path: Path) -> None:
    """``mkdir -p path``; a failure of a known kind is its WriteFailure."""
    with writing(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename tmp_path to `path` (same filesystem, so atomic). A
    write that fails for a known reason raises its ``WriteFailure``; either way the temporary
    file is removed and whatever was at `path` stays as it was."""
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
        failure = write_failure(err, path)
        if failure is not None:
            raise failure from None
        raise


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline, whole or not at all: a failed write is cut back off, so
    the file never ends in half a line. A known failure raises its ``WriteFailure``."""
    data = (line + "\n").encode()
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                done = 0
                while done < len(data):  # a nearly full disk takes part, then says ENOSPC
                    done += os.write(fd, data[done:])
            except OSError:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
