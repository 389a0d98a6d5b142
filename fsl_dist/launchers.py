"""Whether this process runs under a launcher (accelerate's, torchrun), and what that launcher's
stderr is: read from /proc on Linux, elsewhere nothing is known (None, False)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

# Programs whose children are training processes: accelerate's launcher (console script or
# `python -m accelerate.commands.launch`) and torchrun (`torchrun` or `-m torch.distributed.run`).
LAUNCHER_NAMES = frozenset({"accelerate", "accelerate-launch", "torchrun"})
LAUNCHER_MODULES = frozenset({"accelerate.commands.launch", "accelerate.commands.accelerate_cli",
                              "torch.distributed.run", "torch.distributed.launch"})


def is_launcher(argv: Sequence[str]) -> bool:
    """Whether a command line (of the parent process) is accelerate's launcher or torchrun."""
    head = list(argv[:3])
    if any(os.path.basename(a) in LAUNCHER_NAMES for a in head):
        return True
    return any(head[i] == "-m" and head[i + 1] in LAUNCHER_MODULES for i in range(len(head) - 1))


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def launcher_terminal_columns() -> Optional[int]:
    """The width of the terminal that this process's launcher writes to, when the parent is a
    launcher and its own stderr is a terminal (accelerate's copies our piped stderr there);
    else None."""
    parent = os.getppid()
    if not is_launcher(cmdline(parent)):
        return None
    try:  # the parent's fd 2, opened anew: O_NOCTTY, so it never becomes our controlling tty
        fd = os.open(f"/proc/{parent}/fd/2", os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return None
    try:
        return os.get_terminal_size(fd).columns or 80 if os.isatty(fd) else None
    except OSError:
        return None
    finally:
        os.close(fd)
