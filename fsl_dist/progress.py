"""Progress wherever a person watches: a bar on a terminal, plain lines in a log.

    for batch in progress(batches, desc="predicting", quiet=args.quiet or not dist.is_main):
        ...
    with progress(total=episodes, desc="evaluating", unit="ep", quiet=quiet) as bar:
        bar.update(n)

The rule, decided as each bar is made, from where stderr goes:

- stderr is a terminal (`python launch/train.py`, `fsl-train`, the ranks of `accelerate launch
  --multi_gpu`, which inherit it): a live tqdm bar.
- stderr is a pipe from a launcher whose own stderr is a terminal (`accelerate launch` with one
  process reads the trainer's stderr through a pipe and copies it to its own): the same bar,
  as wide as that terminal. Read from /proc (fsl_dist/launchers.py); only accelerate's
  launcher and torchrun count, so `python launch/train.py 2>&1 | tee log` gets lines.
- anything else (a file: `2> log`, `nohup`, SLURM's output file, CI; a pipe to another
  program): plain lines, never a carriage return: one every LINE_EVERY_S seconds and one at
  the end, so that what ends sooner (packing, a short evaluation) writes nothing; the training
  bar (`first_line=True`) also writes one at step 1, with its ETA. Each line has the count,
  elapsed time, ETA, rate and the postfix (loss, accuracy, tasks/s):

      resnet_boil: 12/2000 (1%) [01:02<2:45:10, 5.02s/step, loss=1.234, acc=0.400, tasks_s=6.4]

- `quiet` (`--quiet`): nothing.

In distributed code pass `quiet=... or not dist.is_main`: one bar per job, not one per rank.
"""

from __future__ import annotations

import array
import fcntl
import os
import stat
import sys
import termios
import time
from typing import Iterable, Optional

# tqdm is imported where a bar is made: fsl_dist.signals imports this module, and must load at
# once (cli/train.py sets its Ctrl-C handler before anything slow).
from fsl_dist.launchers import launcher_terminal_columns

# A line at most this often in a log: a SLURM log of a 3-hour run gets about 360 lines.
LINE_EVERY_S = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"  # noqa: E501
COUNT_FORMAT = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # no total known


def bar_columns() -> Optional[int]:
    """How a bar written to stderr now would be seen: 0 on stderr's own terminal (tqdm sizes
    it), the launcher terminal's width through a launcher's pipe, None when nobody watches
    live (plain lines then)."""
    stream = sys.stderr
    if stream is None:
        return None
    if stream.isatty():
        return 0
    try:
        piped = stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # a stream without a file (a test's capture)
        return None
    return launcher_terminal_columns() if piped else None


def below_progress_bar() -> None:
    """Where a bar is drawn, end its line, so that a line printed now starts a new one."""
    columns = bar_columns()
    if columns is not None:
        sys.stderr.write("\n")
        sys.stderr.flush()
    if columns:  # through a launcher's pipe: let it copy that out before a line on stdout
        wait_until_read(sys.stderr.fileno())


def line_stream(stream=None):
    """Where to print a line meant for `stream` (stdout by default) so that it shows after the
    bar: stderr when the bar goes through a launcher's pipe and stdout is that same terminal. A
    line on stdout reaches the terminal at once, and could overtake the bar's last redraw
    still in the launcher (a stop line ended up on the bar's line); through the bar's own pipe
    it keeps its place. `| tee log` (stdout not a terminal) keeps its lines in the log."""
    stream = sys.stdout if stream is None else stream
    if stream is sys.stdout and _isatty(stream) and bar_columns():
        return sys.stderr
    return stream


def _isatty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (ValueError, AttributeError):  # closed, or a capture without a file
        return False


def wait_until_read(fd: int, timeout: float = 0.5) -> None:
    """Wait (at most `timeout` s) until the reader of the pipe `fd` has read all written to it."""
    deadline = time.monotonic() + timeout
    waiting = array.array("i", [1])
    while time.monotonic() < deadline:
        try:
            fcntl.ioctl(fd, termios.FIONREAD, waiting)
        except OSError:
            return
        if waiting[0] == 0:
            return
        time.sleep(0.005)


def progress(iterable: Optional[Iterable] = None, *, desc: Optional[str] = None,
             total: Optional[int] = None, quiet: bool = False, first_line: bool = False,
             **options):
    """A progress bar over `iterable` (or counting to `total`) on stderr, by the module's rule:
    a tqdm bar, `ProgressLines` (with a line at the first unit done if `first_line`), or a
    disabled tqdm (still yields every item) when `quiet`. `options` go to tqdm (`unit`,
    `leave`, `initial`, ...)."""
    from tqdm import tqdm

    if quiet:
        return tqdm(iterable, desc=desc, total=total, disable=True, **options)
    columns = bar_columns()
    if columns is None:
        return ProgressLines(iterable, desc=desc, total=total, first_line=first_line, **options)
    sizing = {"dynamic_ncols": True} if columns == 0 else {"ncols": columns}
    return tqdm(iterable, desc=desc, total=total, disable=False, **sizing, **options)


class ProgressLines:
    """tqdm's counting, rate and ETA, printed to stderr as whole lines: when the first unit is
    done (if `first_line`), every `every` seconds after the last line, and at the end if a line
    was printed before. The part of tqdm's interface fsl_dist uses: iteration, `update`,
    `set_postfix`, `close`, `with`."""

    def __init__(self, iterable: Optional[Iterable] = None, *, desc: Optional[str] = None,
                 total: Optional[int] = None, unit: str = "it", initial: int = 0,
                 first_line: bool = False, every: float = LINE_EVERY_S, file=None,
                 **_tqdm_only):
        self.iterable, self.desc, self.unit = iterable, desc or "", unit
        self.first_line = first_line
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.initial, self.every = total, initial, initial, every
        self.file = file
        self.postfix = ""
        self.disable = False  # as tqdm's: the bar is shown
        self.started = time.monotonic()
        self.last_line: Optional[float] = None  # when the last line was printed
        self.shown_n: Optional[int] = None  # the count it showed

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        first = self.last_line is None and self.first_line
        if first or (now - (self.last_line or self.started)) >= self.every:
            self.print_line(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.disable:
            return
        if self.last_line is not None and self.n != self.shown_n:
            self.print_line(time.monotonic())
        self.disable = True

    def line(self, now: float) -> str:
        from tqdm import tqdm

        return tqdm.format_meter(
            self.n, self.total, now - self.started, prefix=self.desc, unit=self.unit,
            initial=self.initial, postfix=self.postfix or None,
            bar_format=LINE_FORMAT if self.total else COUNT_FORMAT)

    def print_line(self, now: float) -> None:
        stream = self.file or sys.stderr
        stream.write(self.line(now) + "\n")
        stream.flush()
        self.last_line, self.shown_n = now, self.n
