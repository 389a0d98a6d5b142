"""Progress bars: drawn on a terminal, never into a file or pipe, never with quiet=True; the
evaluation bar shows the running mean accuracy."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fsl_dist import progress as fsl_progress
from fsl_dist.config import load_config
from fsl_dist.data import pack_cli, shards
from fsl_dist.distributed import Distributed
from fsl_dist.learners import learner_from_config
from fsl_dist.models import build_model
from fsl_dist.progress import ProgressLines, progress
from fsl_dist.runs import evaluate_held_out

from image_folders import LAYOUT, write_folder
from launching import child_env, command, config_args, run
from terminal import Terminal

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def terminal():
    # pytest puts its capture back on sys.stderr as each test starts: the tests swap it in
    # themselves (monkeypatch), not this fixture.
    tty = Terminal()
    yield tty
    tty.close()


def run_bar(quiet: bool) -> bool:
    """Counts to 3 with a bar and says whether the bar was enabled."""
    with progress(total=3, desc="counting", quiet=quiet) as bar:
        bar.set_postfix(acc="50.00%")
        bar.update(3)
        return not bar.disable


def test_a_terminal_gets_the_bar_with_its_postfix(terminal, monkeypatch):
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    assert sys.stderr.isatty()
    assert run_bar(quiet=False)
    shown = terminal.written()
    assert "counting" in shown and "3/3" in shown and "acc=50.00%" in shown


def test_quiet_silences_the_bar_on_a_terminal(terminal, monkeypatch):
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    assert not run_bar(quiet=True)
    assert terminal.written() == ""


def test_a_file_gets_no_bar(tmp_path, monkeypatch):
    """Nor a line, for what ends within the lines' interval (30 s)."""
    with open(tmp_path / "log", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        assert not log.isatty()
        assert run_bar(quiet=False)
    assert (tmp_path / "log").read_text() == ""


def test_plain_lines_come_at_the_first_step_then_at_their_interval_and_at_the_end(
        tmp_path, monkeypatch):
    """The training bar's lines in a log: step 1 (with an ETA), then one per `every` seconds,
    then the last step. Steps of 0.1 s on a clock the test turns (no waiting, no flakiness)."""
    now = [1000.0]
    monkeypatch.setattr(fsl_progress.time, "monotonic", lambda: now[0])
    with open(tmp_path / "log", "w") as log:
        with ProgressLines(total=40, desc="cnn_maml", unit="step", first_line=True, every=1.0,
                           file=log) as bar:
            for _ in range(40):
                now[0] += 0.1
                bar.set_postfix({"loss": "1.234", "acc": "0.400"})
                bar.update(1)
    lines = (tmp_path / "log").read_text().splitlines()
    counts = [int(re.match(r"cnn_maml: (\d+)/40 \(\d+%\) \[\d\d:\d\d<\d\d:\d\d, +10.00step/s, "
                           r"loss=1.234, acc=0.400\]$", line).group(1)) for line in lines]
    assert counts == [1, 11, 21, 31, 40]
    assert lines[0].startswith("cnn_maml: 1/40 (2%) [00:00<00:03,")  # the ETA from step 1


def test_plain_lines_of_a_long_evaluation_come_at_their_interval_and_the_end(tmp_path,
                                                                              monkeypatch):
    """No line at its first chunk; one per interval, and the end (chunks of 4 every 0.3 s)."""
    now = [1000.0]
    monkeypatch.setattr(fsl_progress.time, "monotonic", lambda: now[0])
    with open(tmp_path / "log", "w") as log:
        with ProgressLines(total=40, desc="validating", unit="ep", every=1.0, file=log) as bar:
            for _ in range(10):
                now[0] += 0.3
                bar.set_postfix(acc="50.00%")
                bar.update(4)
    lines = (tmp_path / "log").read_text().splitlines()
    assert [re.match(r"validating: (\d+)/40 .*, acc=50.00%\]$", line).group(1)
            for line in lines] == ["16", "32", "40"]


@pytest.fixture(scope="module")
def tiny_run(packed, tmp_path_factory):
    cfg = load_config(ROOT / "configs" / "cnn_maml.yaml",
                      [f"data.shards={packed('futurama')}", "model.width=8", "eval.batch_size=4",
                       "eval.inner_steps=1"])
    torch.manual_seed(0)
    model = build_model("cnn", cfg.task.n_way, width=8)
    learner = learner_from_config(cfg, model, inner_lr=0.4)
    return cfg, learner, tmp_path_factory.mktemp("run"), Distributed()


def test_evaluation_shows_the_running_mean_accuracy_on_a_terminal(tiny_run, terminal,
                                                                  monkeypatch):
    cfg, learner, run_dir, dist = tiny_run
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    result = evaluate_held_out(learner, cfg, dist, run_dir, precision="no", episodes=12)
    shown = terminal.written()
    running = re.findall(r"(\d+)/12 [^\r\n]*acc=(\d+\.\d\d)%", shown)  # one per draw
    assert {done for done, _ in running} == {"4", "8", "12"}  # a draw after each chunk of 4
    assert running[-1][0] == "12"
    # after the last chunk, the running mean is the mean over all episodes (one process)
    assert running[-1][1] == f"{result['mean']:.2f}"
    assert "test" in shown  # the part names the bar


def test_evaluation_with_quiet_draws_nothing_on_a_terminal(tiny_run, terminal, monkeypatch):
    cfg, learner, run_dir, dist = tiny_run
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    evaluate_held_out(learner, cfg, dist, run_dir, precision="no", episodes=8, quiet=True)
    assert terminal.written() == ""


def test_packing_a_folder_counts_its_images_unless_quiet(tmp_path, terminal, monkeypatch):
    root = write_folder(tmp_path / "images")
    images = sum(count for count, *_ in LAYOUT.values())
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    common = ["folder", str(root), "--size", "8", "--channels", "3", "--classes-per-shard", "2"]
    assert pack_cli.main([*common, "--out", str(tmp_path / "shown")]) == 0
    shown = terminal.written()
    assert "packing images" in shown and f"{images}/{images}" in shown
    assert pack_cli.main([*common, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert terminal.written() == ""


def test_packing_omniglot_counts_its_images(omniglot_source, tmp_path, terminal, monkeypatch):
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    assert pack_cli.main(["omniglot", "--source", str(omniglot_source), "--split", "futurama",
                          "--out", str(tmp_path / "omniglot")]) == 0
    shown = terminal.written()
    manifest = shards.load_manifest(tmp_path / "omniglot")
    images = 20 * sum(manifest["splits"][part]["classes"] for part in shards.PARTS)  # drawings
    assert "packing omniglot-futurama" in shown and f"{images}/{images}" in shown


# ------------------------------------------------------------------ the scripts, on a terminal


def run_on_terminal(terminal: Terminal, script: str, args: list[str]) -> str:
    """`python launch/<script> args` with stderr on the terminal: what it wrote there."""
    process = subprocess.Popen(command(script, args, 0), cwd=ROOT, env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=terminal.follower)
    shown = []
    while process.poll() is None:  # read as it comes: a full pty would block the writer
        time.sleep(0.2)
        shown.append(terminal.written())
    shown.append(terminal.written())
    assert process.returncode == 0, "".join(shown)[-3000:]
    return "".join(shown)


@pytest.mark.integration
def test_the_scripts_show_bars_only_on_a_terminal_without_quiet(packed, tmp_path, terminal):
    run_dir = tmp_path / "cnn_maml"
    trained = run_on_terminal(terminal, "train.py", [
        *config_args("cnn_maml", run_dir, packed("futurama"), "logging.wandb=false"), "--quiet"])
    assert "\r" not in trained.replace("\r\n", "") and "it/s" not in trained

    evaluate = ["--run-dir", str(run_dir), "--episodes", "30"]
    shown = run_on_terminal(terminal, "evaluate.py", evaluate)
    assert re.search(r"test: +\d+%.*30/30 .*acc=\d+\.\d\d%", shown)  # the running mean
    quiet = run_on_terminal(terminal, "evaluate.py", [*evaluate, "--quiet"])
    piped = run("evaluate.py", evaluate).stderr  # stderr a pipe, no --quiet
    for output in (quiet, piped):
        assert "acc=" not in output and "\r" not in output.replace("\r\n", "")
        assert "test accuracy" in output  # the summary line stays


def test_a_line_for_stdout_stays_on_stdout_when_no_bar_goes_through_a_launcher(tmp_path):
    """progress.line_stream: only a bar copied by a launcher to the terminal that stdout also
    is moves a line to stderr (tests/test_terminal.py shows that case in a real pty); a file,
    a capture or stderr keep theirs."""
    import sys

    from fsl_dist.progress import line_stream

    assert line_stream() is sys.stdout and line_stream(sys.stderr) is sys.stderr
    with open(tmp_path / "log", "w") as log:
        assert line_stream(log) is log
