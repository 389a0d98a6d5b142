"""End to end on a real single-node SLURM cluster (Debian's slurm-wlm and munge): a sweep as an
array job, preemption with requeue and exact resume, and the multi-node script with two tasks.

The cluster is the one `.ci/run` started (found through SLURM_CONF or /etc/slurm/slurm.conf), or
one started here with tests/slurm/start_cluster.sh (root only). Without SLURM or root these
tests skip; with FSL_REQUIRE_SLURM=1 (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fsl_dist.compare import aggregate, from_run_dir
from fsl_dist.sweep import load_sweep
from fsl_dist.wandb_offline import find_run_files, read_run

from launching import ROOT, run
from launching import child_env as launch_env
from slurm_cluster import (
    TERMINAL,
    TINY,
    _unavailable,
    job_states,
    overrides,
    release_requeued,
    slurm_cmd,
    wait_done,
    wait_for,
)

pytestmark = pytest.mark.slow
CLUSTER_SCRIPTS = ROOT / "tests" / "slurm"


# ---------------------------------------------------------------- the cluster


def _answers(env: dict) -> bool:
    if not shutil.which("scontrol"):
        return False
    ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=30)
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True,
                           timeout=30)
    return "is UP" in ping.stdout and any(s in state.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="session")
def slurm():
    """Environment (SLURM_CONF, PATH with this interpreter first) for talking to a cluster."""
    env = launch_env(PYTHONPATH=ROOT, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if not env.get("SLURM_CONF") and Path("/etc/slurm/slurm.conf").exists():
        env["SLURM_CONF"] = "/etc/slurm/slurm.conf"
    if env.get("SLURM_CONF") and _answers(env):
        yield env  # started by .ci/run (or by hand): leave it running
        return
    if os.geteuid() != 0:
        _unavailable("no running SLURM cluster, and starting one needs root "
                     "(slurmd launches jobs as their user)")
    # not under pytest's 0700 temporary folders: munged wants every folder above its socket
    # world-executable
    base = Path(os.environ.get("TMPDIR", "/tmp")) / "fsl_dist-slurm-tests"
    cluster_env = dict(env, SLURM_CI_DIR=str(base), SLURM_CI_SMOKE="0")
    started = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "start_cluster.sh")], env=cluster_env,
                             capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        _unavailable("tests/slurm/start_cluster.sh could not start a SLURM cluster:\n"
                     f"{started.stderr[-3000:]}")
    env["SLURM_CONF"] = str(base / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPTS / "stop_cluster.sh"), "--quiet"],
                       env=cluster_env, timeout=120)


@pytest.fixture(scope="session")
def shards(packed):
    return packed("futurama")


def write_sweep(path: Path, configs: list[str], seeds: list[int], values: dict,
                runs_dir: Path) -> Path:
    body = {"configs": [str(ROOT / "configs" / f"{c}.yaml") for c in configs], "seeds": seeds,
            "overrides": values, "runs_dir": str(runs_dir)}
    path.write_text(json.dumps(body, indent=1))  # JSON is YAML
    return path


# ---------------------------------------------------------------- a sweep as an array job


def test_sweep_runs_as_an_array_job_and_compares(slurm, shards, tmp_path):
    values = dict(TINY, **{"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
                           "data.shards": str(shards), "logging.wandb": True})
    sweep_file = write_sweep(tmp_path / "tiny_grid.yaml", ["cnn_maml", "cnn_boil"], [0, 1], values,
                             tmp_path / "runs")
    submitted = run("sweep.py", ["submit", str(sweep_file), "--cpus-per-task=1", "--time=10"],
                    env=slurm)
    job = submitted.stdout.strip().split()[-1]  # "Submitted batch job N"
    sweep = load_sweep(sweep_file)
    logs = [sweep.group_dir() / f"slurm-{job}_{i}.out" for i in range(4)]
    states = wait_done(slurm, job, tasks=4, timeout=240, logs=logs)
    assert set(states.values()) == {"COMPLETED"}, states

    for spec in sweep.runs():
        folder = sweep.run_dir(spec)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert (config["name"], config["train"]["seed"]) == (spec.config_name, spec.seed)
        assert config["algorithm"]["name"] == spec.config_name.split("_")[1]
        assert config["logging"]["group"] == "tiny_grid" and config["model"]["width"] == 8
        assert json.loads((folder / "eval.json").read_text())["episodes"] == 10
        [wandb_file] = find_run_files(folder)
        meta = read_run(wandb_file)["meta"]
        assert (meta["group"], meta["name"]) == ("tiny_grid", folder.name)
        log = (sweep.group_dir() / f"slurm-{job}_{spec.index}.out").read_text()
        assert f"task {spec.index}" in log and f"{spec.config_name} seed {spec.seed}" in log

    # compare.py over the sweep: the numbers of the table come from the run folders
    plot = tmp_path / "curves.png"
    out = run("compare.py", ["--sweep", str(sweep_file), "--plot", str(plot)], env=slurm).stdout
    runs = [from_run_dir(sweep.run_dir(r)) for r in sweep.runs()]
    for r in runs:
        evaluation = json.loads((Path(r.source) / "eval.json").read_text())
        assert r.test_acc == evaluation["mean"] and r.steps == 4 and r.finished
        assert r.wall_time_s and r.tasks_per_s
        assert f"{r.test_acc:.2f} ± {evaluation['ci95']:.2f}" in out
    groups = aggregate(runs)
    assert [(g.label, len(g.runs)) for g in groups] == [("cnn_maml", 2), ("cnn_boil", 2)]
    for g in groups:
        mean, std = g.mean_std("test_acc")
        tests = [r.test_acc for r in g.runs]
        assert mean == pytest.approx(sum(tests) / 2)
        assert f"{mean:.2f} ± {std:.2f}" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- preemption


def test_preempted_job_checkpoints_requeues_and_matches_an_uninterrupted_run(slurm, shards,
                                                                            tmp_path):
    """The signal is sent with `scancel --signal=USR1 --batch` once the first checkpoint exists:
    what `--signal=B:USR1@N` delivers, at a moment the test controls (SLURM checks time limits
    about once a minute, too coarse for a test of seconds)."""
    values = dict(TINY, **{"train.steps": 100, "train.eval_every": 50, "train.checkpoint_every": 5,
                           "data.shards": str(shards), "logging.wandb": True})
    sweep_file = write_sweep(tmp_path / "preempt.yaml", ["cnn_maml"], [3], values,
                             tmp_path / "runs")
    sweep = load_sweep(sweep_file)
    folder = sweep.run_dir(sweep.run(0))
    log = tmp_path / "job.out"
    # by hand, as a user would: sbatch from the project root, `python3` from the environment
    job = slurm_cmd(slurm, "sbatch", "--parsable", "--array=0", "--cpus-per-task=1",
                    f"--output={log}", str(ROOT / "launch" / "slurm" / "array.sbatch"),
                    str(sweep_file)).strip()
    task = f"{job}_0"
    wait_for(lambda: (list((folder / "checkpoints").glob("step-*.pt"))
                      or job_states(slurm, job).get(task) in TERMINAL),
             120, "the first checkpoint")
    slurm_cmd(slurm, "scancel", "--signal=USR1", "--batch", task)

    release_requeued(slurm, task)  # stopped at a checkpoint and requeued
    states = wait_done(slurm, job, tasks=1, timeout=180, logs=[log])
    assert states[task] == "COMPLETED", states
    text = log.read_text()
    assert ("stopped by a signal at step" in text and "requeueing job" in text
            and "restart 1" in text)
    stopped_at = int(text.split("stopped by a signal at step ")[1].split(" of ")[0])
    assert 5 <= stopped_at < 100
    assert (f"resumed from {folder / 'checkpoints' / f'step-{stopped_at:08d}.pt'} "
            f"at step {stopped_at}") in text

    # no step lost or repeated; one W&B run continued across the requeue
    train_steps = [json.loads(line)["step"]
                   for line in (folder / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in line]
    assert train_steps == list(range(1, 101))
    segments = [read_run(p)["meta"] for p in find_run_files(folder)]
    assert len(segments) == 2 and segments[0]["id"] == segments[1]["id"]
    assert json.loads((folder / "run.json").read_text())["wandb_id"] == segments[0]["id"]

    # the same run uninterrupted, outside SLURM, through the same entry point
    other = tmp_path / "uninterrupted"
    run("sweep.py", ["run", str(sweep_file), "--index", "0", "--runs-dir", str(other)], env=slurm,
        timeout=300)
    resumed = load_file(str(folder / "model.safetensors"))
    straight = load_file(str(sweep.run_dir(sweep.run(0), other) / "model.safetensors"))
    assert resumed.keys() == straight.keys()
    for name in resumed:
        assert torch.equal(resumed[name], straight[name]), name


# ---------------------------------------------------------------- multi-node


def test_multinode_script_with_two_tasks_on_one_node_survives_preemption(slurm, shards, tmp_path):
    """Two srun tasks stand in for two nodes: each runs its own `accelerate launch` with its
    machine rank (SLURM_PROCID), both meet at the first node's address (its NodeAddr). The job is
    signalled once a checkpoint exists: srun passes USR1 to both machines, the two ranks agree to
    stop after the same step, the job requeues itself and finishes as a 2-process run."""
    run_dir = tmp_path / "mn"
    log = tmp_path / "mn.out"
    args = ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--run-dir", str(run_dir),
            *overrides(dict(TINY, **{"train.steps": 60, "train.eval_every": 60,
                                     "train.checkpoint_every": 5, "data.shards": str(shards),
                                     "logging.wandb": False}))]
    job = slurm_cmd(slurm, "sbatch", "--parsable", "--nodes=1", "--ntasks=2",
                    "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}",
                    str(ROOT / "launch" / "slurm" / "multinode.sbatch"), *args).strip()
    wait_for(lambda: (list((run_dir / "checkpoints").glob("step-*.pt"))
                      or job_states(slurm, job).get(job) in TERMINAL),
             120, "the first checkpoint")
    slurm_cmd(slurm, "scancel", "--signal=USR1", "--batch", job)
    release_requeued(slurm, job)
    states = wait_done(slurm, job, tasks=1, timeout=240, logs=[log])
    assert states[job] == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert text.count("2 machines on") == 2 and "restart 1" in text
    assert text.count("machine 0/2") == 2 and text.count("machine 1/2") == 2
    stopped_at = int(text.split("stopped by a signal at step ")[1].split(" of ")[0])
    assert f"at step {stopped_at}" in text.split("restart 1")[1]  # resumed where it stopped
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["world_size"], info["backend"]) == (2, "gloo")
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["world_size"] == 2
    train_steps = [json.loads(line)["step"]
                   for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in line]
    assert train_steps == list(range(1, 61))
