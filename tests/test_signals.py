"""Stopping a run with a signal (fsl_dist/signals.py), through real launchers and real signals.

Every way a user starts training (`python launch/train.py`, `accelerate launch` with one process,
`accelerate launch --multi_gpu`) and every way they stop it (SIGTERM to the launcher, Ctrl-C:
SIGINT to the whole foreground process group, emulated with a new session and killpg) must end
the same: the step finishes, a checkpoint of it is written, exactly one line says so (no
traceback), `--resume auto` continues from it, and no training process outlives the launcher.
The unit tests at the top start no process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsl_dist.checkpoint import checkpoint_path, latest_checkpoint
from fsl_dist.signals import StopRequest, is_launcher

from launching import ROOT, child_env, command

# Tiny but real (as tests/test_train_distributed.py): Conv-4 of width 8, 5-way 1-shot, a long
# run that only a signal ends, with no periodic checkpoint, so the stop writes the one there is.
TINY = ["model.width=8", "task.k_shot=1", "task.q_query=2", "train.meta_batch_size=4",
        "train.steps=100000", "train.checkpoint_every=100000", "train.eval_every=100000",
        "train.log_every=1", "eval.episodes=10", "eval.val_episodes=4", "eval.batch_size=10",
        "eval.inner_steps=1", "logging.wandb=false"]
STOP_LINE = re.compile(r"stopped by a signal at step (\d+) of \d+;")
# Lines about a stop that are not fsl_dist's: torch's elastic agent logs these warnings when it
# passes a signal on (LOGLEVEL=ERROR hides them; README, "Stopping and resuming").
AGENT_LINE = re.compile(r"death signal, shutting down workers|Sending process \d+ closing signal")


# ------------------------------------------------------------------ unit tests (no process)

@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/python", "/venv/bin/accelerate", "launch", "launch/train.py"], True),
    (["/usr/bin/python3", "-m", "accelerate.commands.launch", "--multi_gpu"], True),
    (["/venv/bin/python", "/venv/bin/torchrun", "--nproc-per-node", "2"], True),
    (["python", "-m", "torch.distributed.run", "train.py"], True),
    (["accelerate-launch", "train.py"], True),
    (["-bash"], False),
    (["/bin/bash", "run_accelerate_job.sh"], False),
    (["python", "launch/sweep.py", "run", "sweep.yaml"], False),
    ([], False),
])
def test_is_launcher_knows_accelerate_and_torchrun_only(argv, expected):
    assert is_launcher(argv) is expected


def test_stop_request_counts_interrupts_and_keeps_the_first_signal():
    stop = StopRequest()
    assert not stop.requested
    stop.handle(signal.SIGTERM)
    stop.handle(signal.SIGTERM)  # a launcher passing the same request on again: still a stop
    stop.handle(signal.SIGUSR1)
    assert stop.requested and stop.signum == signal.SIGTERM and stop.interrupts == 0
    stop.handle(signal.SIGINT)  # the first Ctrl-C after a SIGTERM is a stop request too
    assert stop.interrupts == 1 and stop.signum == signal.SIGTERM


# ------------------------------------------------------------------ real processes

LEAVING = """
import atexit, sys, threading, time
from fsl_dist.signals import leave
out = sys.argv[1]
atexit.register(lambda: open(out, "a").write("exit handler\\n"))
class Teardown:  # an object the interpreter's teardown would finalize
    def __del__(self, open=open):  # open itself may be gone by then
        open(out, "a").write("teardown\\n")
keep = Teardown()
worker = threading.Thread(target=lambda: (time.sleep(0.3), open(out, "a").write("thread\\n")))
worker.start()
print("buffered, not flushed", end="")
leave(3)
"""


@pytest.mark.integration
def test_leave_waits_for_threads_runs_exit_handlers_and_skips_teardown(tmp_path):
    out = tmp_path / "order.txt"
    result = subprocess.run([sys.executable, "-c", LEAVING, str(out)], cwd=ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered, not flushed" and not result.stderr
    assert out.read_text() == "thread\nexit handler\n"  # no "teardown": no finalizers ran


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


def _proc_state(pid: int) -> str | None:
    """State letter of `pid` (None once it is gone; 'Z' a zombie nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _default_sigint() -> None:
    """A shell gives its foreground job the default SIGINT; pytest started in the background of
    a script inherits it ignored, and accelerate's launcher would then ignore the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """One training command started in its own session (as a shell starts a foreground job),
    its output in files (no pipe a stopped reader could fill)."""

    def __init__(self, tmp_path: Path, shards: Path, processes: int, *extra: str, name="run"):
        self.run_dir = tmp_path / name
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        args = ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--run-dir",
                str(self.run_dir), f"data.shards={shards}", *TINY, *extra]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(command("train.py", args, processes), cwd=ROOT,
                                         env=child_env(), stdout=out, stderr=err,
                                         start_new_session=True, preexec_fn=_default_sigint)
        self.processes = processes

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for_steps(self, steps: int = 2, timeout: float = 120) -> list[int]:
        """Wait until `steps` training steps are logged; returns the PIDs of the launcher's
        descendants then (the training processes and any helper of theirs)."""
        metrics = self.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"ended early:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no step in {timeout} s:\n{self.output()[-3000:]}"
            if metrics.exists() and metrics.read_text().count('"train/loss"') >= steps:
                break
            time.sleep(0.05)
        pids = [self.proc.pid] if self.processes == 0 else descendants(self.proc.pid)
        assert len(pids) >= max(self.processes, 1), pids
        return pids

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"still running after {timeout} s:\n{self.output()[-3000:]}")


def assert_one_stop_line(run: Run, launcher_traceback: bool = False) -> int:
    """Exactly one line of fsl_dist's about the stop, no traceback; returns the stopped step.
    `launcher_traceback`: accelerate 1.15's launcher prints its own traceback (KeyboardInterrupt
    on Ctrl-C with one process; torch's SignalException with several), not fsl_dist's to avoid:
    allowed once, and taken out before the checks."""
    text = run.output()
    if launcher_traceback:
        block = re.compile(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*"
                           r"(?:KeyboardInterrupt|\S*SignalException: Process \d+ got signal: \d+)"
                           r"\n?")
        text = text.replace("\r", "\n")
        blocks = block.findall(text)
        assert len(blocks) == 1 and "accelerate/commands/launch.py" in blocks[0], text[-4000:]
        assert str(ROOT) not in blocks[0], blocks[0]  # the launcher's, no frame of ours
        text = block.sub("", text)
    assert "Traceback" not in text, text[-4000:]
    lines = [line for line in re.split(r"[\r\n]+", text)
             if re.search(r"signal|interrupt|stopp", line, re.I) and not AGENT_LINE.search(line)]
    assert len(lines) == 1 and STOP_LINE.search(lines[0]), f"stop lines {lines}:\n{text[-3000:]}"
    return int(STOP_LINE.search(lines[0]).group(1))


def assert_resumes(run: Run, shards: Path, tmp_path: Path, step: int, *extra: str,
                   steps: int = 2) -> None:
    """The checkpoint of the stopped step is the newest, and --resume auto continues from it
    (`steps` more, in one process)."""
    assert checkpoint_path(run.run_dir, step).is_file()
    assert latest_checkpoint(run.run_dir) == checkpoint_path(run.run_dir, step)
    args = ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--run-dir", str(run.run_dir),
            f"data.shards={shards}", *TINY, *extra, f"train.steps={step + steps}",
            "--resume", "auto"]
    result = subprocess.run(command("train.py", args, 0), cwd=ROOT, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint_path(run.run_dir, step)} at step {step}" in result.stdout
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, step + steps + 1))


def assert_none_left(pids: list[int], grace: float = 0.0) -> None:
    deadline = time.monotonic() + grace
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    assert not left, f"processes outlived the launcher: {left}"


def simple_launcher_forwards_signals() -> bool:
    """accelerate >= 1.16's simple launcher passes SIGTERM/SIGINT on and reaps its children, and
    its multi-process launcher exits 128 + signal; 1.15 and older die of SIGTERM without passing
    it on, and re-raise torch's SignalException (a traceback, exit 1)."""
    from accelerate.commands import launch

    return hasattr(launch, "_terminate_process_tree")


@pytest.mark.integration
@pytest.mark.parametrize("sig, how", [(signal.SIGTERM, "kill"), (signal.SIGINT, "ctrl-c")])
def test_python_directly(sig, how, shards, tmp_path):
    """`python launch/train.py`: SIGTERM or Ctrl-C -> checkpoint, one line, exit 75."""
    run = Run(tmp_path, shards, 0)
    run.wait_for_steps()
    (os.killpg if how == "ctrl-c" else os.kill)(run.proc.pid, sig)
    assert run.wait() == 75
    assert_resumes(run, shards, tmp_path, assert_one_stop_line(run))


@pytest.mark.integration
@pytest.mark.parametrize("sig, how", [(signal.SIGTERM, "kill"), (signal.SIGINT, "ctrl-c")])
def test_accelerate_simple_launcher(sig, how, shards, tmp_path):
    """`accelerate launch launch/train.py` (one process): SIGTERM to the launcher, or Ctrl-C to
    launcher and trainer together. accelerate >= 1.16 passes it on as SIGTERM and exits 128 +
    signal once the trainer is done; the trainer must be gone by then."""
    run = Run(tmp_path, shards, 1)
    pids = run.wait_for_steps()
    (os.killpg if how == "ctrl-c" else os.kill)(run.proc.pid, sig)
    status = run.wait()
    forwards = simple_launcher_forwards_signals()
    if forwards:
        assert status == 128 + sig
        assert_none_left(pids)
    else:  # 1.15: the launcher died at once; the trainer stops by itself (PR_SET_PDEATHSIG)
        assert status == -sig
        assert_none_left(pids, grace=30)
    step = assert_one_stop_line(run, launcher_traceback=not forwards and sig == signal.SIGINT)
    assert_resumes(run, shards, tmp_path, step)


@pytest.mark.integration
def test_simple_launcher_stop_does_not_wait_for_a_long_step(shards, tmp_path):
    """accelerate's simple launcher kills 5 s after passing a signal on, less than a step of the
    README's ResNet on a CPU (4-8 s measured). One process under a launcher checkpoints the last
    finished step at once when the signal comes during a step's tasks or meta-gradient, rather
    than finish the step. Steps of about 3 s here (Conv-4 of width 32, 16 tasks of 5 shots)."""
    slow = ["model.width=32", "train.meta_batch_size=16", "task.k_shot=5", "task.q_query=5"]
    run = Run(tmp_path, shards, 1, *slow)
    pids = run.wait_for_steps(1)
    os.killpg(run.proc.pid, signal.SIGINT)
    status = run.wait()
    forwards = simple_launcher_forwards_signals()
    assert status == (130 if forwards else -signal.SIGINT)
    assert_none_left(pids, grace=0 if forwards else 30)
    step = assert_one_stop_line(run, launcher_traceback=not forwards)
    assert step == 1, f"stopped at step {step}"  # step 2, in progress, was not finished
    assert_resumes(run, shards, tmp_path, step, *slow, steps=1)


@pytest.mark.integration
def test_launcher_killed_outright_still_stops_the_trainer(shards, tmp_path):
    """SIGKILL to accelerate's launcher (the OOM killer; accelerate 1.15 on SIGTERM): the trainer
    gets SIGTERM from the kernel (PR_SET_PDEATHSIG), checkpoints and ends instead of training on
    as an orphan."""
    run = Run(tmp_path, shards, 1)
    pids = run.wait_for_steps()
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert_none_left(pids, grace=30)
    assert_resumes(run, shards, tmp_path, assert_one_stop_line(run))


@pytest.mark.integration
@pytest.mark.parametrize("sig, how", [(signal.SIGTERM, "kill"), (signal.SIGINT, "ctrl-c")])
def test_accelerate_multi_gpu(sig, how, shards, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (torch's elastic agent): it passes the
    signal to both ranks, which stop after the same step; it exits 128 + signal after them."""
    run = Run(tmp_path, shards, 2)
    pids = run.wait_for_steps()
    (os.killpg if how == "ctrl-c" else os.kill)(run.proc.pid, sig)
    forwards = simple_launcher_forwards_signals()  # 1.15 re-raises torch's SignalException
    assert run.wait(timeout=90) == (128 + sig if forwards else 1)
    assert_none_left(pids)
    assert_resumes(run, shards, tmp_path, assert_one_stop_line(run, not forwards))


@pytest.mark.integration
def test_second_ctrl_c_quits_at_once(shards, tmp_path):
    """A second Ctrl-C while the step is still running: one line, exit 130, no traceback. Steps
    of 2-3 s (16 tasks of 5 shots, width 32) leave time for the second, 0.2 s later (after the
    step, the stop's checkpoint and final files take about that long, the handler still set)."""
    run = Run(tmp_path, shards, 0, "model.width=32", "train.meta_batch_size=16",
              "task.k_shot=5", "task.q_query=5")
    run.wait_for_steps(1)
    os.killpg(run.proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.wait() == 130
    text = run.output()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    lines = [line for line in re.split(r"[\r\n]+", text) if re.search(r"interrupt|stopp", line)]
    assert len(lines) == 1 and "interrupted again" in lines[0], lines


@pytest.mark.integration
def test_ctrl_c_while_starting_prints_one_line(shards, tmp_path):
    """Ctrl-C before training (imports, data): nothing to save, one line, exit 130."""
    run = Run(tmp_path, shards, 0)
    time.sleep(1.0)
    assert run.proc.poll() is None
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.wait() == 130
    text = run.output()
    assert "Traceback" not in text and text.strip().splitlines() == [
        "fsl_dist: interrupted while starting; nothing to save"], text[-3000:]
    assert not (run.run_dir / "checkpoints").exists()
