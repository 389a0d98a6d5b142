"""Write failures told apart by errno, in process (the same through real processes, real
permissions and real mounts: test_write_faults.py)."""

from __future__ import annotations

import errno
import os

import pytest

from fsl_dist.exits import exit_code
from fsl_dist.io import (
    DiskFullError,
    NotAFolderError,
    ReadOnlyError,
    WriteDeniedError,
    WriteFailure,
    atomic_write,
    check_writable,
    make_folder,
    write_failure,
)


@pytest.mark.parametrize("code, kind, exit_status, says", [
    (errno.ENOSPC, DiskFullError, 74, "no space left on the device writing"),
    (errno.EDQUOT, DiskFullError, 74, "no space left on the device writing"),
    (errno.EACCES, WriteDeniedError, 77, "permission denied writing"),
    (errno.EPERM, WriteDeniedError, 77, "permission denied writing"),
    (errno.EROFS, ReadOnlyError, 73, "is on a read-only file system"),
])
def test_each_errno_is_its_own_failure_with_its_own_exit_code(code, kind, exit_status, says,
                                                               tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def failing(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(code, os.strerror(code))

    with pytest.raises(kind) as raised:
        atomic_write(target, failing)
    assert says in str(raised.value) and str(target) in str(raised.value)
    assert exit_code(raised.value) == exit_status
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_a_known_errno_wins_and_an_unknown_one_stays_a_bug(tmp_path):
    # Plenty of space here: an errno that says "full" is believed all the same...
    assert isinstance(write_failure(OSError(errno.ENOSPC, "full"), tmp_path / "f"),
                      DiskFullError)
    # ...and an error without one, or with another errno, is no write failure we can name.
    assert write_failure(RuntimeError("file write failed"), tmp_path / "f") is None
    assert write_failure(OSError(errno.EIO, "I/O error"), tmp_path / "f") is None
    assert write_failure(KeyboardInterrupt(), tmp_path / "f") is None
    # safetensors' writer gives the errno only in its message (measured on a full tmpfs)
    hidden = Exception("Error while serializing: I/O error: Read-only file system (os error 30)")
    assert isinstance(write_failure(hidden, tmp_path / "f"), ReadOnlyError)


def test_a_file_where_a_folder_should_be_is_a_wrong_path(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    target = notes / "out" / "labels.csv"
    for attempt in (lambda: check_writable(target),
                    lambda: atomic_write(target, lambda tmp: tmp.write_text("x")),
                    lambda: make_folder(notes),
                    lambda: make_folder(notes / "run")):
        with pytest.raises(NotAFolderError, match=f"{notes} is a file, not a folder") as raised:
            attempt()
        assert exit_code(raised.value) == 2
    assert notes.read_text() == "mine\n" and list(tmp_path.iterdir()) == [notes]
    # EEXIST with no file in the way is not this failure
    assert write_failure(FileExistsError(errno.EEXIST, "exists"), tmp_path / "x") is None


def test_the_writability_probe_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "eval.json")  # folders made later: fine
    assert list(tmp_path.iterdir()) == []


def test_write_failures_survive_the_broadcast_to_other_ranks():
    import pickle

    failure = WriteDeniedError("permission denied writing x")
    failure.raised_on_main = True
    copy = pickle.loads(pickle.dumps(failure))
    assert type(copy) is WriteDeniedError and str(copy) == str(failure)
    assert copy.raised_on_main and isinstance(copy, WriteFailure)
