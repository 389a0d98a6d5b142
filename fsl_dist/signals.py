"""Stopping a training process with a signal: Ctrl-C, `kill`, SLURM's warning, a dying launcher.

Every stop signal takes the path of SLURM's preemption warning: the trainer finishes the step it
is in, all ranks agree, it writes a checkpoint, prints one line and exits 75 (EXIT_RESUMABLE)
(see Trainer.fit and launch/train.py). What reaches the training process, by how it was started
(measured with accelerate 1.15 and 1.16, torch 2.14; README, "Stopping and resuming"):

- `python launch/train.py`: Ctrl-C (SIGINT) and `kill` (SIGTERM) reach it directly; exit 75.
- `accelerate launch launch/train.py` (accelerate's simple launcher, one process): Ctrl-C
  reaches launcher and trainer alike. accelerate >= 1.16 passes SIGTERM and SIGINT on to the
  trainer (and to W&B's service process) as SIGTERM, waits 5 s, kills what is left with SIGKILL
  and exits 143 (SIGTERM) or 130 (SIGINT). A step can take longer (4-8 s for the README's
  ResNet-BOIL on a 2-core CPU), so one process under a launcher saves the last finished step at
  once when the signal comes during a step's tasks or meta-gradient, or during validation
  (StopRequest.on_first, Trainer._stop_now_if_safe, which reads the phase fit() sets).
  accelerate 1.15 and older die of SIGTERM at once without passing it on, and a Ctrl-C prints
  the launcher's KeyboardInterrupt traceback; the trainer then notices through
  `die_with_launcher` below.
- `accelerate launch --multi_gpu` (torch's elastic agent): the agent catches SIGTERM, SIGINT,
  SIGHUP and SIGQUIT, sends the same signal to every worker's process group (workers run in
  their own sessions, so a terminal's Ctrl-C reaches only the agent), waits up to 30 s
  (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and exits 128 + signal.

A second Ctrl-C (SIGINT) quits at once, without a checkpoint of the current step. Repeated
SIGTERM and SIGUSR1 do not: SLURM signals every process of a job step, and launchers pass the
same signal on again, so one request often arrives twice.

Ctrl-C typed in a terminal reaches the whole foreground process group at once (tests/
test_terminal.py types it into a real pty). Before training (catch_ctrl_c_while_starting) it
quits with one line; under accelerate's launcher the SIGTERM that follows at once is taken the
same way, not left to kill silently. A process started with SIGINT ignored (a script's
background job, `accelerate launch ... &`: its launcher ignores Ctrl-C too) keeps ignoring it
(ignores_ctrl_c); SIGTERM still stops it. Every clean quit (quit_now) releases what at_quit
registered, such as the run folder's lock.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import stat
import sys
import threading
from types import FrameType
from typing import Callable, NoReturn, Optional, Sequence

from fsl_dist.launchers import cmdline, is_launcher
from fsl_dist.progress import below_progress_bar, line_stream

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: quit without a checkpoint, as a shell reports Ctrl-C
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

def die_with_launcher(sig: int = signal.SIGTERM) -> Optional[int]:
    """Ask the kernel to send `sig` to this process when its launcher dies (Linux
    prctl(PR_SET_PDEATHSIG)), so that a launcher killed outright (SIGKILL, the OOM killer,
    accelerate 1.15 on SIGTERM) leaves no trainer running on: with the stop handlers installed
    the trainer takes the checkpointing path. Only under accelerate's launcher or torchrun: a
    process started from a shell must outlive it (`nohup python launch/train.py &`). Returns
    the launcher's PID when it was set, else None."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getppid()
    if not is_launcher(cmdline(parent)):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return None
    except (OSError, AttributeError):
        return None
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), sig)
    return parent


def keep_stderr_writable() -> None:
    """After the launcher died: accelerate's (>= 1.16) reads this process's stderr through a
    pipe, and the next write to it (the progress bar) would raise BrokenPipeError and end the
    process before its checkpoint. Send stderr where stdout goes (the terminal, a log file), or
    to /dev/null when that is a pipe too."""
    try:
        if not stat.S_ISFIFO(os.fstat(2).st_mode):
            return
        if not stat.S_ISFIFO(os.fstat(1).st_mode):
            os.dup2(1, 2)
        else:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
    except OSError:
        pass


class StopRequest:
    """The stop flag a signal sets and the training loop reads between steps.

    `install()` handles `signals` (default SIGTERM, SIGUSR1, SIGINT): the first sets
    `requested`; a second SIGINT prints `quit_line()` to stderr and ends the process at once
    with status 130 (os._exit: no teardown, no traceback; checkpoints are written atomically,
    so the newest one stays whole)."""

    def __init__(self, quit_line: Optional[Callable[[], str]] = None):
        self.signum: Optional[int] = None
        self.interrupts = 0
        self.launcher: Optional[int] = None  # PID of the launcher, if die_with_launcher set it
        # Called with the interrupted frame on the first stop signal; may end the process.
        self.on_first: Optional[Callable[[Optional[FrameType]], None]] = None
        self.quit_line = quit_line or (lambda: "fsl_dist: interrupted again: quitting now, "
                                       "without a checkpoint of this step")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self, signals: Sequence[int] = STOP_SIGNALS) -> "StopRequest":
        """Handle `signals` (but a SIGINT this process was started ignoring: see
        ignores_ctrl_c), then stop also when the launcher dies (die_with_launcher)."""
        for sig in signals:
            if sig == signal.SIGINT and ignores_ctrl_c():
                continue
            signal.signal(sig, self.handle)
        if signal.SIGTERM in signals:
            self.launcher = die_with_launcher(signal.SIGTERM)
        return self

    def handle(self, signum: int, frame: Optional[FrameType] = None) -> None:
        if self.launcher is not None and os.getppid() != self.launcher:
            keep_stderr_writable()  # the launcher is gone, and with it the reader of a pipe
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                quit_now(self.quit_line())
        if self.signum is None:
            self.signum = signum
            if self.on_first is not None:
                self.on_first(frame)


def stop_line(step: int, planned: int, checkpoint) -> str:
    """The one line of a clean stop (tests/test_slurm.py reads the step from it)."""
    return (f"stopped by a signal at step {step} of {planned}; checkpoint written ({checkpoint}), "
            "continue with --resume auto")


_AT_QUIT: list[Callable[[], None]] = []


def at_quit(release: Callable[[], None]) -> None:
    """Have quit_now call `release` (quick, such as giving up a lock) before the process ends:
    a clean quit leaves nothing that reads as a crash to the next run."""
    _AT_QUIT.append(release)


def quit_now(line: str, status: int = EXIT_INTERRUPTED, *, stdout: bool = False) -> None:
    """Print one line (to stderr, or stdout) and end the process without unwinding: no
    KeyboardInterrupt traceback, no teardown (checkpoints and metrics rows are written whole)
    but what at_quit asked for."""
    try:
        for release in _AT_QUIT:
            try:
                release()
            except Exception:  # noqa: BLE001 (quitting anyway; the kernel drops what is left)
                pass
        if line:
            below_progress_bar()
            print(line, file=line_stream(sys.stdout) if stdout else sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def leave(status: int) -> NoReturn:
    """End a process whose results are all written, with `status`: waits for its other
    non-daemon threads and runs Python's exit handlers (logging's flush, W&B's service stop,
    temporary folders), then ends without the interpreter's teardown and C++'s static
    destructors. Those page in code of CUDA's libraries even on a CPU run (libcublasLt's), about
    0.13 GB more resident set at exit than the run ever held, and took about a second: a memory
    budget, `/usr/bin/time` and SLURM's MaxRSS would count that peak as the run's."""
    try:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()  # CPython's: what interpreter shutdown runs first
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def ignores_ctrl_c() -> bool:
    """Whether SIGINT is ignored, as it is for a process started so: a shell script's
    background job (`accelerate launch ... &`), whose launcher then ignores the terminal's
    Ctrl-C too. Such a process keeps ignoring it, as Python and Unix programs do: a trainer
    that stopped on it would exit 75 under a launcher still running, which reports that as a
    crash (a CalledProcessError traceback, exit 1). SIGTERM still stops it."""
    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def catch_ctrl_c_while_starting() -> None:
    """Until Trainer.stop_on_signals: a Ctrl-C (unless SIGINT is ignored: ignores_ctrl_c), or
    the SIGTERM that accelerate's launcher sends right after the terminal's Ctrl-C reached it,
    quits with one line (interrupted_while_starting)."""
    if not ignores_ctrl_c():
        signal.signal(signal.SIGINT, interrupted_while_starting)
    signal.signal(signal.SIGTERM, interrupted_while_starting)


def interrupted_while_starting(signum: int = signal.SIGINT, _frame=None) -> None:
    """Handler for the seconds before training (imports, data, the process group), when there
    is nothing to save: one line (from rank 0 only) instead of a KeyboardInterrupt traceback
    or a silent death, exit 128 + signal. Trainer.stop_on_signals replaces it."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # one line, whichever of them comes next
        signal.signal(sig, signal.SIG_IGN)
    quiet = os.environ.get("RANK", "0") != "0"
    what = "interrupted" if signum == signal.SIGINT else "stopped by a signal"
    quit_now("" if quiet else f"fsl_dist: {what} while starting; nothing to save", 128 + signum)
