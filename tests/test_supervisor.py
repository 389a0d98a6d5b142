"""The preemption plumbing without SLURM and without training: a stand-in training script with
train.py's exit contract (tests/payloads/fake_train.py) behind a launcher that, like accelerate's,
reports every failure as 1. The supervisor must pass the stop request to the training process
only, and turn "stopped with a checkpoint" back into exit status 75."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fsl_dist import slurm
from fsl_dist.slurm import EXIT_RESUMABLE, catches, outcome, supervise, worker_pids

from launching import ROOT
from launching import child_env as launch_env

PAYLOADS = Path(__file__).resolve().parent / "payloads"
FAKE_TRAIN = PAYLOADS / "fake_train.py"


def launcher_argv(run_dir: Path) -> list[str]:
    return [sys.executable, str(PAYLOADS / "fake_launcher.py"), str(FAKE_TRAIN),
            "--run-dir", str(run_dir)]


def signal_me_when(path: Path, sig: int, timeout: float = 20) -> threading.Thread:
    """Send `sig` to this process (as SLURM would to the batch step) once `path` exists."""
    def wait_then_signal():
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), sig)
    thread = threading.Thread(target=wait_then_signal, daemon=True)
    thread.start()
    return thread


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_a_signal_becomes_a_checkpoint_and_exit_75(tmp_path, sig):
    thread = signal_me_when(tmp_path / "started-0.jsonl", sig)
    status = supervise(launcher_argv(tmp_path), launch_env(FAKE_TRAIN_SECONDS=30),
                       script=FAKE_TRAIN, run_dir=tmp_path, log=lambda *a, **k: None)
    thread.join()
    assert status == EXIT_RESUMABLE
    assert ((tmp_path / "checkpoints" / "step-00000003.pt").is_file()
            and not (tmp_path / "done.json").exists())


@pytest.mark.integration
def test_an_early_signal_is_not_fatal_and_is_passed_on_later(tmp_path):
    """A signal that arrives before the trainer installed its handler is ignored (inherited
    SIG_IGN), not fatal; the supervisor passes it on once the handler is there."""
    env = launch_env(FAKE_TRAIN_SECONDS=30)
    # the training process runs this first: it ignores USR1 (as inherited) for its first second
    code = ("import signal,time,runpy,sys; time.sleep(1.0); sys.argv=sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    argv = [sys.executable, str(PAYLOADS / "fake_launcher.py"), "-c", code, str(FAKE_TRAIN),
            "--run-dir", str(tmp_path)]
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    started = time.monotonic()
    status = supervise(argv, env, script=FAKE_TRAIN, run_dir=tmp_path, log=lambda *a, **k: None)
    assert status == EXIT_RESUMABLE and time.monotonic() - started < 10


def quiet(*args, **kwargs):
    pass


@pytest.mark.integration
def test_a_finished_run_exits_0(tmp_path):
    assert supervise(launcher_argv(tmp_path), launch_env(FAKE_TRAIN_SECONDS=0.1), script=FAKE_TRAIN,
                     run_dir=tmp_path, log=quiet) == 0
    assert (tmp_path / "done.json").is_file()


@pytest.mark.integration
def test_a_failed_run_exits_1(tmp_path):
    crash = [sys.executable, str(PAYLOADS / "fake_launcher.py"), "-c", "import sys; sys.exit(3)"]
    assert supervise(crash, launch_env(), script=FAKE_TRAIN, run_dir=tmp_path, log=quiet) == 1


@pytest.mark.parametrize("status, stop_requested, run_dir, expected", [
    (1, True, "none", 1),  # a stop was asked for but there is no checkpoint: a failure
    (1, False, ".", 1),
    (-9, False, ".", 137),  # killed by SIGKILL: the shell's 128 + 9
], ids=["stopped-without-checkpoint", "failed", "killed"])
def test_unresumable_outcomes(tmp_path, status, stop_requested, run_dir, expected):
    assert outcome(status, stop_requested=stop_requested, run_dir=tmp_path / run_dir) == expected


@pytest.mark.integration
def test_only_the_training_processes_are_signalled(tmp_path):
    """Descendants running the training script are found; the launcher and helpers (like W&B's
    service process) are not."""
    # The helper says when its own child has started: between fork and exec a child still
    # shows its parent's command line, the training script's (a CI run caught that instant).
    ready = tmp_path / "ready"
    helper = ("import pathlib,subprocess,sys,time; "
              "p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); "
              "pathlib.Path(sys.argv[2]).write_text('ready'); time.sleep(30)")
    launcher = subprocess.Popen([sys.executable, "-c",
                                 "import subprocess,sys; "
                                 "subprocess.call([sys.executable,'-c',*sys.argv[1:]])",
                                 helper, str(FAKE_TRAIN), str(ready)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not ready.exists():
            time.sleep(0.05)
        found = worker_pids(launcher.pid, FAKE_TRAIN)
        assert len(found) == 1 and found[0] != launcher.pid
        argv = Path(f"/proc/{found[0]}/cmdline").read_bytes().split(b"\0")
        assert str(FAKE_TRAIN).encode() in argv
        # catches() reads the kernel's record of installed handlers. (Not SIGINT: a shell that
        # starts a job in the background makes it ignore SIGINT, and Python then installs none.)
        previous = signal.signal(signal.SIGUSR2, lambda *_: None)
        try:
            assert catches(os.getpid(), signal.SIGUSR2)
        finally:
            signal.signal(signal.SIGUSR2, previous)
        assert catches(os.getpid(), signal.SIGUSR2) == callable(previous)
    finally:
        children, tree = slurm._children_map(), [launcher.pid]
        for pid in tree:
            tree.extend(children.get(pid, []))
        for pid in reversed(tree):  # the processes this test started, by id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()


@pytest.mark.integration
def test_array_script_forwards_the_signal_and_requeues_without_slurm(tmp_path):
    """launch/slurm/array.sbatch run by bash with SLURM's variables and a stand-in `scontrol`:
    USR1 to the batch shell -> the run checkpoints -> status 75 -> `scontrol requeue JOBID`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    (bin_dir / "scontrol").chmod(0o755)
    sweep = tmp_path / "sw.yaml"
    sweep.write_text(f"configs: [{ROOT / 'configs' / 'cnn_maml.yaml'}, "
                     f"{ROOT / 'configs' / 'cnn_boil.yaml'}]\n"
                     f"seeds: [0, 1]\nruns_dir: {tmp_path / 'runs'}\n")
    env = launch_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=ROOT,
                   SLURM_ARRAY_TASK_ID=3, SLURM_ARRAY_JOB_ID=40, SLURM_JOB_ID=43,
                   SLURM_SUBMIT_DIR=ROOT, FSL_PYTHON=sys.executable,
                   CUDA_VISIBLE_DEVICES="", FAKE_TRAIN_SECONDS=60)
    job = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm" / "array.sbatch"), str(sweep),
                            "--script", str(FAKE_TRAIN)], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "sw" / "cnn_boil-s1"
    deadline = time.monotonic() + 60
    while (not (run_dir / "started-0.jsonl").exists() and time.monotonic() < deadline
           and job.poll() is None):
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=60)
    assert job.returncode == EXIT_RESUMABLE, out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "43"], out
    assert (run_dir / "checkpoints").is_dir()
    started = (run_dir / "started-0.jsonl").read_text()
    assert ("train.seed=1" in started and "logging.group=sw" in started
            and '"--resume", "auto"' in started)
