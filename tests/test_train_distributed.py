"""The distributed trainer through real `accelerate launch` processes (gloo ranks on CPU):
two ranks give the parameters of one process, an interrupted run resumes exactly, and a rank
killed with SIGKILL ends the job without harming the last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fsl_dist.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint
from fsl_dist.meta.precision import cpu_has_bf16_instructions

from launching import ROOT, child_env, command
from training_runs import TINY, assert_world, max_abs_difference, train, weights


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


@pytest.fixture(scope="module")
def two_rank_maml(shards, tmp_path_factory):
    """An uninterrupted 2-rank MAML run: the reference for equality and for resume."""
    run_dir = tmp_path_factory.mktemp("two-rank") / "run"
    train(run_dir, shards, 2)
    assert_world(run_dir, 2)
    return run_dir


@pytest.mark.parametrize("extra, tolerance", [
    ((), 1e-6),
    (("algorithm.name=boil",), 1e-6),
    # Proto-MAML: its prototype head makes the last batch norm's shift a near-null direction
    # (exactly null before adaptation, as in ProtoNet below): measured 1.2e-6 there, every
    # other tensor within 2e-7
    (("algorithm.proto_head=true",), 1e-5),
    # bf16 (one thread per process on both sides, so every task's own computation is the same
    # kernel sequence): the per-task values agree, only the float32 sum of the per-task
    # meta-gradients runs in another order. Where bf16 rounding leaves a component near zero,
    # Adam's first steps divide it by its own size (+ eps), turning a 1e-9 residual into up to
    # ~0.1 lr per step: measured 2.5e-4 after 6 steps at lr 1e-3, so the bound is lr itself.
    (("precision=bf16", "train.cpu_threads=1"), 1e-3),
], ids=["maml", "boil", "protomaml", "maml-bf16"])
def test_two_ranks_give_the_parameters_of_one_process(shards, tmp_path, two_rank_maml, extra,
                                                      tolerance):
    if extra:
        two = tmp_path / "two"
        train(two, shards, 2, *extra)
        assert_world(two, 2)
    else:
        two = two_rank_maml
    one = tmp_path / "one"
    result = train(one, shards, 0, *extra)
    assert_world(one, 1)
    if "precision=bf16" in extra:  # warned exactly where this CPU has no bf16 instructions
        warned = "bf16 is emulated" in result.stdout + result.stderr
        assert warned == (cpu_has_bf16_instructions() is False), result.stdout
    difference = max_abs_difference(weights(one), weights(two))
    assert difference < tolerance, f"max |one - two| = {difference:.3g}"
    # the first step starts from identical weights on identical tasks: identical loss
    first = [next(json.loads(line)["train/loss"]
                  for line in (d / "metrics.jsonl").read_text().splitlines()
                  if "train/loss" in line) for d in (one, two)]
    assert first[0] == pytest.approx(first[1], rel=1e-6)


def test_a_two_rank_run_continues_on_one_process(shards, tmp_path, two_rank_maml):
    """After losing a node: the 2-rank run, resumed in its own folder from its step-2
    checkpoint on one process, ends with the 2-rank run's parameters (the same tasks per step,
    only the sum over them in another order); run.json records both segments."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_maml, run_dir)
    resumed = train(run_dir, shards, 0, "--resume", str(checkpoint_path(run_dir, 2)))
    assert "at step 2" in resumed.stdout
    difference = max_abs_difference(weights(two_rank_maml), weights(run_dir))
    assert difference < 1e-6, f"max |2 ranks - 2 then 1| = {difference:.3g}"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["segments"] == [{"step": 0, "world_size": 2}, {"step": 2, "world_size": 1}]
    assert info["config_changes"] == [] and info["world_size"] == 1


def test_uneven_meta_batch_is_refused_before_training(shards, tmp_path):
    result = train(tmp_path / "run", shards, 2, "train.meta_batch_size=3", check=False)
    assert result.returncode != 0
    assert "train.meta_batch_size" in result.stderr and "2 processes" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def _processes() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv), read from /proc (ps would cut long command lines)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended while we looked
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        found[int(entry.name)] = (parent, argv)
    return found


def _rank_pids(launcher_pid: int) -> list[int]:
    """PIDs of the training ranks started by an accelerate launcher: its descendants whose
    argv runs launch/train.py itself (not the launcher)."""
    processes = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    found, frontier = [], [launcher_pid]
    while frontier:
        for pid in children.get(frontier.pop(), []):
            frontier.append(pid)
            argv = processes[pid][1]
            if (any(a.endswith("launch/train.py") for a in argv)
                    and not any("accelerate" in a for a in argv)):
                found.append(pid)
    return sorted(found)


def test_killed_rank_ends_the_job_and_the_run_resumes_exactly(shards, tmp_path):
    """SIGKILL one of two ranks of a long run once a checkpoint exists: the launcher must end
    the job with a non-zero status within a bounded time, the newest checkpoint must load, and
    resuming from it must give bitwise the parameters of an uninterrupted run of that length."""
    run_dir = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--run-dir", str(run_dir),
            f"data.shards={shards}", *TINY, "train.steps=100000", "train.eval_every=100000"]
    launcher = subprocess.Popen(command("train.py", args, 2), cwd=ROOT, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(run_dir) is None:
            assert launcher.poll() is None, launcher.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        ranks = _rank_pids(launcher.pid)
        assert len(ranks) == 2, f"expected 2 rank processes, found {ranks}"
        os.kill(ranks[-1], signal.SIGKILL)
        killed_at = time.monotonic()
        code = launcher.wait(timeout=120)
        ended_after = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert code != 0, "the job must fail when a rank dies"
    assert ended_after < 120
    saved = load_checkpoint(latest_checkpoint(run_dir))  # intact: loads and holds a whole state
    stopped_at = saved["step"]
    assert stopped_at >= 2 and stopped_at % 2 == 0 and "optimizer" in saved and saved["model"]

    end = f"train.steps={stopped_at + 2}"
    train(run_dir, shards, 2, "--resume", "auto", end, "train.eval_every=100000")
    reference = tmp_path / "reference"
    train(reference, shards, 2, end, "train.eval_every=100000")
    assert_world(run_dir, 2)
    a, b = weights(run_dir), weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_abs_difference(a, b):.3g}"


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(shards, tmp_path):
    """One process: stopped after 2 steps, then resumed to 6 (also extends train.steps)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(whole, shards, 0)
    train(parts, shards, 0, "train.steps=2")
    train(parts, shards, 0, "--resume", "auto")
    a, b = weights(whole), weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_abs_difference(a, b):.3g}"
    steps = [json.loads(line)["step"] for line in (parts / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]


# MAML++ options of fsl_dist, on for the whole run: the multi-step loss annealed over steps 0-3
# and off from step 4, first order on steps 0-2 and second order from step 3, per-step learned
# inner step sizes, per-step batch-norm weights and running statistics (their all-reduced
# updates are in the compared weights), the cosine outer rate.
MAMLPP = ("algorithm.inner_steps=2", "algorithm.msl_steps=4", "algorithm.first_order_steps=3",
          "algorithm.learn_inner_lr=per_step", "algorithm.per_step_bn_weights=true",
          "algorithm.per_step_bn_stats=true", "optim.schedule=cosine", "optim.min_lr=1e-5")


@pytest.fixture(scope="module")
def mamlpp_one(shards, tmp_path_factory):
    """A one-process MAML++ run, default inner loop: the reference of the checkpoint levels."""
    run_dir = tmp_path_factory.mktemp("mamlpp-one") / "run"
    train(run_dir, shards, 0, *MAMLPP)
    assert_world(run_dir, 1)
    return run_dir


def test_mamlpp_two_ranks_equal_one_and_resume_is_bitwise_across_the_switches(shards, tmp_path,
                                                                              mamlpp_one):
    one, two, resumed = mamlpp_one, tmp_path / "two", tmp_path / "resumed"
    train(two, shards, 2, *MAMLPP)
    assert_world(two, 2)
    a, b = weights(one), weights(two)
    # [inner steps, adapted tensors of Conv-4]: 4 conv weights and the head's two; the
    # per-step batch-norm sets ([inner steps, channels]) do not adapt
    assert a["inner_lr.per_step"].shape == (2, 6)
    assert a["features.0.1.weight"].shape[0] == 2
    assert a["features.0.1.running_mean"].shape[0] == 2 and a["features.0.1.running_mean"].any()
    difference = max_abs_difference(a, b)
    assert difference < 1e-6, f"max |one - two| = {difference:.3g}"
    # row s reports the spec of step s - 1 (s - 1 steps had finished when it ran)
    rows = train_rows(one)
    assert [r["train/second_order"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [r["train/msl_last_weight"] for r in rows] == pytest.approx(
        [0.5, 0.625, 0.75, 0.875, 1, 1], rel=1e-12)
    # from the step-2 checkpoint of the one-process run, across both switches (steps 3 and 4)
    train(resumed, shards, 0, *MAMLPP, "--resume", str(checkpoint_path(one, 2)))
    assert train_rows(resumed) == [
        {k: r[k] for k in ("step", "train/second_order", "train/msl_last_weight")}
        for r in rows[2:]]
    c = weights(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a), f"max diff {max_abs_difference(a, c):.3g}"


# The closed-form families with their learned values (their gradients are in the all-reduce
# too), trained 5-way and validated and tested 3-way, as ProtoNet's paper trains with more
# ways than it tests. NULL: a tensor whose exact gradient is zero in some coordinates, so that
# what it gets is rounding noise (ProtoNet's distances do not change when the last batch
# norm's shift moves every feature of a channel alike, wherever its pooled maximum is active
# for every image); the sum over 4 tasks rounds in another order on 2 processes, and Adam's
# first steps scale any noise up to the learning rate: measured 1.2e-3 after 6 steps. It is
# bounded by steps x lr there; every other tensor must agree within 1e-6.
CLOSED_FORM = {
    "protonet": (("algorithm.name=protonet", "protonet.learn_scale=true", "eval.n_way=3"),
                 "scale.log_scale", "features.3.1.bias"),
    "ridge": (("algorithm.name=ridge", "ridge.learn_lambda=true", "eval.n_way=3"),
              "ridge.log_lam", None),
}


@pytest.mark.parametrize("family", sorted(CLOSED_FORM))
def test_closed_form_two_ranks_equal_one_and_resume_is_bitwise(shards, tmp_path, family):
    overrides, learned, null = CLOSED_FORM[family]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    train(one, shards, 0, *overrides)
    train(two, shards, 2, *overrides)
    assert_world(two, 2)
    a, b = weights(one), weights(two)
    assert learned in a  # exported with the model
    if null is not None:
        noise = (a.pop(null) - b.pop(null)).abs().max().item()
        assert noise <= 6 * 1e-3, f"{null}: max |one - two| = {noise:.3g}"
    difference = max_abs_difference(a, b)
    assert difference < 1e-6, f"max |one - two| = {difference:.3g}"
    assert json.loads((one / "eval.json").read_text())["n_way"] == 3
    train(resumed, shards, 0, *overrides, "--resume", str(checkpoint_path(one, 2)))
    a, c = weights(one), weights(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a), f"max diff {max_abs_difference(a, c):.3g}"


def train_rows(run_dir: Path) -> list[dict]:
    """The training rows of a run's metrics: step and the MAML++ schedules' values."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "train/second_order", "train/msl_last_weight")}
            for r in rows if "train/loss" in r]


# lee2019 on the Omniglot shards (one channel: saturation does nothing), padding scaled to 28 px.
AUGMENT = ("data.augment=lee2019", "data.augment_padding=3")


def test_augmented_two_ranks_equal_one_and_resume_is_bitwise(shards, tmp_path, two_rank_maml):
    """Augmentation seeded by (seed, step, task): two ranks (the vmap path) train on the images
    one process (the loop path) augments, and a run resumed from its step-2 checkpoint meets the
    images it would have met."""
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    train(one, shards, 0, *AUGMENT, "algorithm.vectorize=false")
    train(two, shards, 2, *AUGMENT, "algorithm.vectorize=true")
    assert_world(two, 2)
    a, b = weights(one), weights(two)
    difference = max_abs_difference(a, b)
    assert difference < 1e-6, f"max |one - two| = {difference:.3g}"
    train(resumed, shards, 0, *AUGMENT, "algorithm.vectorize=false", "--resume",
          str(checkpoint_path(one, 2)))
    c = weights(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a), f"max diff {max_abs_difference(a, c):.3g}"
    assert max_abs_difference(a, weights(two_rank_maml)) > 1e-4  # it trained on other images


def one_two_and_resumed(shards, tmp_path, *extra) -> tuple[dict, dict, dict]:
    """Weights after 6 steps of one process, of two ranks, and of a new process resumed from
    the one-process run's step-2 checkpoint."""
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    train(one, shards, 0, *extra)
    train(two, shards, 2, *extra)
    assert_world(one, 1)
    assert_world(two, 2)
    train(resumed, shards, 0, *extra, "--resume", str(checkpoint_path(one, 2)))
    assert [r["step"] for r in train_rows(resumed)] == [3, 4, 5, 6]
    return weights(one), weights(two), weights(resumed)


@pytest.mark.parametrize("level", ["steps", "blocks"])
def test_checkpoint_levels_train_as_the_default_on_two_ranks_and_across_resume(
        shards, tmp_path, mamlpp_one, level):
    """algorithm.checkpoint with every MAML++ option (second order from step 3): the default's
    parameters (the meta-gradients agree to float32 rounding), two ranks give one process's,
    and a resumed process continues bitwise (the levels keep no state of their own)."""
    one, two, resumed = one_two_and_resumed(shards, tmp_path, *MAMLPP,
                                            f"algorithm.checkpoint={level}")
    for other, what in ((weights(mamlpp_one), "default"), (two, "two ranks")):
        difference = max_abs_difference(one, other)
        assert difference < 1e-6, f"max |{level} - {what}| = {difference:.3g}"
    assert all(torch.equal(one[k], resumed[k]) for k in one), \
        f"max diff {max_abs_difference(one, resumed):.3g}"


def test_implicit_meta_gradient_on_two_ranks_and_across_resume(shards, tmp_path):
    """algorithm.meta_gradient=implicit (its one all-reduce like the default's): two ranks give
    one process's parameters and a resumed process continues bitwise."""
    one, two, resumed = one_two_and_resumed(shards, tmp_path, "algorithm.meta_gradient=implicit",
                                            "algorithm.inner_steps=2")
    difference = max_abs_difference(one, two)
    assert difference < 1e-6, f"max |one - two| = {difference:.3g}"
    assert all(torch.equal(one[k], resumed[k]) for k in one), \
        f"max diff {max_abs_difference(one, resumed):.3g}"
