"""The README's main command as a person meets it: in a real terminal (a pseudo-terminal whose
line discipline turns a typed Ctrl-C into SIGINT for the whole foreground process group, the
launcher and the trainers alike), and with its output in a log file (SLURM, CI).

`accelerate launch` reads the trainer's stderr through a pipe: the bar must still be drawn on
the terminal, and a log must still get progress lines (fsl_dist/progress.py). A Ctrl-C must end
in exactly one line, exit 130 (75 without a launcher: README, "Stopping and resuming") and a
checkpoint, with W&B (offline, as by default) on and off, and the run folder left free."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from fsl_dist.checkpoint import checkpoint_path, latest_checkpoint
from fsl_dist.slurm import free_port

from launching import ROOT, child_env

pytestmark = pytest.mark.integration

# The README's ResNet-BOIL, made tiny; a run that only Ctrl-C ends, with no periodic checkpoint
TINY = ["model.width=8", "task.k_shot=1", "task.q_query=2", "train.meta_batch_size=2",
        "train.steps=100000", "train.checkpoint_every=100000", "train.eval_every=100000",
        "train.log_every=1"]
BAR = re.compile(r"resnet_boil: +\d+%\|[^\r\n]*\| *[1-9]\d*/100000 \[")  # a step done, drawn
STOP_LINE = re.compile(r"^stopped by a signal at step (\d+) of 100000; checkpoint written "
                       r"\(.*\), continue with --resume auto$")
# torch's elastic agent (--multi_gpu) logs these as it passes the signal on (README)
AGENT_LINE = re.compile(r"death signal, shutting down workers|Sending process \d+ closing signal")


def accelerate_launch(*options: str) -> list[str]:
    """`accelerate launch` as the README types it (the console script beside this Python)."""
    script = Path(sys.executable).with_name("accelerate")
    launcher = [str(script), "launch"] if script.exists() else [
        sys.executable, "-m", "accelerate.commands.launch"]
    return [*launcher, *options]


def readme_command(launcher: list[str], run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [*launcher, "launch/train.py", "--config", "configs/resnet_boil.yaml", "--run-dir",
            str(run_dir), f"data.shards={shards}", *TINY, *extra]


def user_env() -> dict:
    env = child_env()
    env.pop("WANDB_SILENT")  # as a user has it: W&B may print what it likes
    return env


class TerminalJob:
    """A command run as a shell runs a foreground job in a terminal of 40 x 120: it leads a new
    session whose controlling terminal is a fresh pty, with the default SIGINT (a shell's
    background job would inherit it ignored)."""

    def __init__(self, argv: list[str], env: dict, sigint=signal.SIG_DFL):
        leader, follower = os.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))

        def foreground_job():  # after setsid (start_new_session): take the pty as terminal
            signal.signal(signal.SIGINT, sigint)
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=follower, stdout=follower,
                                     stderr=follower, start_new_session=True,
                                     preexec_fn=foreground_job)
        os.close(follower)
        self.leader, self.shown, self.typed_at = leader, b"", None

    def read(self, seconds: float) -> bool:
        """Read what the terminal shows for up to `seconds`; False once nothing is left."""
        if select.select([self.leader], [], [], seconds)[0]:
            try:
                chunk = os.read(self.leader, 65536)
            except OSError:  # EIO: every process holding the terminal is gone
                chunk = b""
            self.shown += chunk
            return bool(chunk)
        return True

    def text(self, start: int = 0) -> str:
        return self.shown[start:].decode(errors="replace")

    def wait_for(self, pattern: re.Pattern, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not pattern.search(self.text()):
            assert self.proc.poll() is None, f"ended early:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"not shown in {timeout} s:\n{self.text()[-3000:]}"
            self.read(0.1)

    def ctrl_c(self) -> None:
        self.typed_at = len(self.shown)
        os.write(self.leader, b"\x03")  # the terminal's interrupt character (VINTR)

    def wait(self, timeout: float = 90) -> int:
        deadline = time.monotonic() + timeout
        while self.read(0.1) and time.monotonic() < deadline:
            pass
        try:
            return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"still running after {timeout} s:\n{self.text()[-3000:]}")
        finally:
            os.close(self.leader)

    def lines_after_ctrl_c(self) -> list[str]:
        """What the terminal showed after the Ctrl-C, as lines: without the terminal's `^C`
        echo, the bar's redraws and the elastic agent's log lines."""
        text = self.text(self.typed_at).replace("^C", "")
        return [line.strip() for line in re.split(r"[\r\n]+", text)
                if line.strip() and not line.startswith("resnet_boil: ")
                and not AGENT_LINE.search(line)]


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"  # its first row may come just after the bar's step 1
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def assert_clean_stop(job: TerminalJob, run_dir: Path) -> int:
    """One line after the Ctrl-C (the stop line), no traceback or stray message, a checkpoint
    of the step it names, and the run folder's lock given up. Returns the step."""
    whole = job.text()
    assert "Traceback" not in whole and "socket.send" not in whole, whole[-4000:]
    lines = job.lines_after_ctrl_c()
    assert len(lines) == 1 and STOP_LINE.match(lines[0]), f"{lines}\n{whole[-3000:]}"
    step = int(STOP_LINE.match(lines[0]).group(1))
    assert step >= 1 and latest_checkpoint(run_dir) == checkpoint_path(run_dir, step)
    assert (run_dir / ".lock").read_text() == ""  # released: the next start takes no "stale" one
    return step


@pytest.mark.parametrize("wandb", ["wandb-offline", "wandb-off"])
def test_readme_command_shows_its_bar_and_stops_on_ctrl_c(wandb, shards, tmp_path):
    """`accelerate launch launch/train.py --config configs/resnet_boil.yaml` (one process,
    its stderr piped through the launcher): the bar on the terminal, then Ctrl-C -> 130."""
    run_dir = tmp_path / "run"
    extra = ["logging.wandb=false"] if wandb == "wandb-off" else []
    job = TerminalJob(readme_command(accelerate_launch(), run_dir, shards, *extra), user_env())
    job.wait_for(BAR)
    job.ctrl_c()
    assert job.wait() == 130, job.text()[-3000:]
    assert_clean_stop(job, run_dir)


def test_two_processes_show_the_bar_and_stop_on_ctrl_c(shards, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (torch's elastic agent, gloo on CPU),
    W&B offline: the bar, then Ctrl-C -> 130, both ranks having run."""
    run_dir = tmp_path / "run"
    launcher = accelerate_launch("--multi_gpu", "--num_processes", "2",
                                 "--main_process_port", str(free_port()))
    job = TerminalJob(readme_command(launcher, run_dir, shards), user_env())
    job.wait_for(BAR)
    job.ctrl_c()
    assert job.wait() == 130, job.text()[-3000:]
    assert_clean_stop(job, run_dir)
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2


def test_ctrl_c_while_the_trainer_starts_is_one_line(shards, tmp_path):
    """Ctrl-C a second after accelerate started the trainer (it is importing torch): the
    launcher's SIGTERM follows the terminal's SIGINT at once, and must not kill the trainer
    before it has said so. One line, 130, nothing written."""
    run_dir = tmp_path / "run"
    job = TerminalJob(readme_command(accelerate_launch(), run_dir, shards), user_env())
    job.wait_for(re.compile(r"run `accelerate config`"))  # the launcher's last words before
    time.sleep(1.0)
    job.ctrl_c()
    assert job.wait() == 130, job.text()[-3000:]
    assert "Traceback" not in job.text(), job.text()[-3000:]
    assert job.lines_after_ctrl_c() == ["fsl_dist: interrupted while starting; nothing to save"]
    assert not (run_dir / "checkpoints").exists()


def test_a_job_started_with_sigint_ignored_ignores_ctrl_c(shards, tmp_path):
    """A script's background job (`accelerate launch ... &`) inherits SIGINT ignored: its
    launcher ignores the Ctrl-C. The trainer used to stop on it anyway and exit 75 under a
    launcher still running, which printed a CalledProcessError traceback and exited 1. Now both
    ignore it, and SIGTERM to the launcher (`kill`) stops the run with one line."""
    run_dir = tmp_path / "run"
    job = TerminalJob(readme_command(accelerate_launch(), run_dir, shards, "logging.wandb=false"),
                      user_env(), sigint=signal.SIG_IGN)
    job.wait_for(BAR)
    job.ctrl_c()
    steps = logged_steps(run_dir)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # training goes on
        assert job.read(0.1) and job.proc.poll() is None, job.text()[-3000:]
    assert logged_steps(run_dir) > steps
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait() == 143, job.text()[-3000:]
    assert_clean_stop(job, run_dir)


def test_python_directly_shows_the_bar_and_stops_on_ctrl_c(shards, tmp_path):
    """`python launch/train.py` in the terminal, W&B offline: Ctrl-C -> the same line, 75."""
    run_dir = tmp_path / "run"
    job = TerminalJob(readme_command([sys.executable], run_dir, shards), user_env())
    job.wait_for(BAR)
    job.ctrl_c()
    assert job.wait() == 75, job.text()[-3000:]
    assert_clean_stop(job, run_dir)


def test_a_log_file_gets_progress_lines(shards, tmp_path):
    """`accelerate launch ... > log 2>&1`, as in a SLURM script: no terminal anywhere, so the
    training progress comes as plain lines (step 1 and the last step here), never a bar."""
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    args = ["model.width=8", "task.k_shot=1", "task.q_query=2", "train.meta_batch_size=2",
            "train.steps=3", "train.eval_every=3", "eval.val_episodes=4", "eval.episodes=10",
            "eval.batch_size=10", "eval.inner_steps=1", "logging.wandb=false"]
    command = [*accelerate_launch(), "launch/train.py", "--config", "configs/cnn_maml.yaml",
               "--run-dir", str(run_dir), f"data.shards={shards}", *args]
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, env=child_env(), stdout=out, stderr=out,
                              stdin=subprocess.DEVNULL, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text
    progress = re.compile(r"^cnn_maml: (\d)/3 \(\d+%\) \[\d\d:\d\d<\d\d:\d\d, .*, loss=\d\.\d{3}, "
                          r"acc=\d\.\d{3}, tasks_s=\d+\.\d\]$")
    shown = [int(m.group(1)) for m in map(progress.match, text.splitlines()) if m]
    assert shown[0] == 1 and shown[-1] == 3, text[-3000:]
