"""Multi-node training across real addresses: a two-node SLURM cluster on this machine in which
each slurmd runs in its own Linux network namespace with its own address
(tests/slurm/start_netns_cluster.sh: node fslnn1 at 10.231.0.11, fslnn2 at 10.231.0.12, slurmctld
on a bridge at 10.231.0.1). `launch/slurm/multinode.sbatch -N 2` runs one training process per
node; the two meet over gloo through the veth interfaces, not at 127.0.0.1.

1. The two-node run ends with the parameters of a one-process run of the same config (1e-6,
   as two ranks on one machine do: tests/test_train_distributed.py).
2. SIGKILL to one node's training process mid-run (node 2's, then node 1's): the job fails
   within KILL_BOUND_S seconds, and the job requeued (`scontrol requeue`; multinode.py always
   passes --resume auto) resumes from the last checkpoint and ends bitwise equal to the
   uninterrupted two-node run, its metrics steps 1..N once each.

The cluster is started and removed here (module fixture; namespaces, veths, bridge and daemons
go even when a test fails). Root only: without root, or where network namespaces cannot be made,
these tests skip saying so; with FSL_REQUIRE_SLURM=1 (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fsl_dist.checkpoint import latest_checkpoint, load_checkpoint

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
from training_runs import assert_world, max_abs_difference, weights

pytestmark = pytest.mark.slow
SCRIPTS = ROOT / "tests" / "slurm"
PREFIX, NET = "fslnn", "10.231.0"  # start_netns_cluster.sh's defaults, passed to it explicitly
NODES = {f"{PREFIX}1": f"{NET}.11", f"{PREFIX}2": f"{NET}.12"}
STEPS = 40
# From the SIGKILL to the job's end. Expected: seconds (the surviving rank's gloo connection is
# reset and its collective raises; each node's launcher then ends). Enforced by the test, and by
# the job itself twice over: FSL_COLLECTIVE_TIMEOUT_S below ends a collective that waits on a
# peer that vanished without a reset, and srun --wait=120 (multinode.sbatch) ends the tasks of
# a node whose launcher outlived the other (the latter is longer than this bound, so a job that
# only that catches fails this test).
KILL_BOUND_S = 60
COLLECTIVE_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def netns_slurm():
    """Environment (SLURM_CONF of the two-node cluster, this interpreter first on PATH)."""
    if os.geteuid() != 0:
        _unavailable("network namespaces and slurmd need root (not root here)")
    env = launch_env(PYTHONPATH=ROOT, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                     FSL_ROOT=ROOT, FSL_COLLECTIVE_TIMEOUT_S=COLLECTIVE_TIMEOUT_S)
    env.pop("SLURM_CONF", None)
    base = Path(os.environ.get("TMPDIR", "/tmp")) / "fsl_dist-netns-cluster"
    cluster_env = dict(env, NETNS_CI_DIR=str(base), NETNS_CI_PREFIX=PREFIX, NETNS_CI_NET=NET)
    try:
        started = subprocess.run(["bash", str(SCRIPTS / "start_netns_cluster.sh")],
                                 env=cluster_env, capture_output=True, text=True, timeout=600)
        if started.returncode != 0:
            _unavailable("tests/slurm/start_netns_cluster.sh could not start the two-node "
                         f"cluster (network namespaces unavailable?):\n{started.stderr[-3000:]}")
        env["SLURM_CONF"] = str(base / "slurm.conf")
        yield env
    finally:
        stopped = subprocess.run(["bash", str(SCRIPTS / "stop_netns_cluster.sh")],
                                 env=cluster_env, capture_output=True, text=True, timeout=180)
        assert stopped.returncode == 0, f"teardown left something behind:\n{stopped.stderr}"


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


def train_overrides(shards: Path) -> list[str]:
    return overrides(dict(TINY, **{"train.steps": STEPS, "train.eval_every": STEPS,
                                   "train.checkpoint_every": 5, "data.shards": str(shards),
                                   "logging.wandb": False}))


def submit(env: dict, run_dir: Path, log: Path, shards: Path) -> str:
    return slurm_cmd(env, "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
                     "--cpus-per-task=1", f"--output={log}",
                     str(ROOT / "launch" / "slurm" / "multinode.sbatch"),
                     "--config", str(ROOT / "configs" / "cnn_maml.yaml"),
                     "--run-dir", str(run_dir), *train_overrides(shards)).strip()


def train_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]


def assert_two_namespaced_machines(text: str) -> None:
    """Each machine ran on its own node and sent gloo's traffic through its own namespace's
    interface (what multinode.py found towards the main address)."""
    assert f"2 machines on {PREFIX}[1-2], main {NODES[PREFIX + '1']}:" in text, text[-3000:]
    for rank, node in enumerate(NODES):
        assert f"machine {rank}/2 on {node}: 1 CPU process, main {NODES[PREFIX + '1']}:" in text
        assert f"gloo over {PREFIX}-v{rank + 1} ->" in text, text[-3000:]


@pytest.fixture(scope="module")
def two_node_run(netns_slurm, shards, tmp_path_factory):
    """An uninterrupted two-node run: (run folder, its log)."""
    folder = tmp_path_factory.mktemp("netns-two-node")
    run_dir, log = folder / "run", folder / "job.out"
    job = submit(netns_slurm, run_dir, log, shards)
    states = wait_done(netns_slurm, job, tasks=1, timeout=300, logs=[log])
    assert states[job] == "COMPLETED", log.read_text()[-4000:]
    return run_dir, log.read_text()


def test_two_nodes_over_their_own_addresses_give_the_parameters_of_one_process(
        netns_slurm, shards, two_node_run, tmp_path):
    run_dir, text = two_node_run
    assert_two_namespaced_machines(text)
    assert_world(run_dir, 2)
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "eval.json").read_text())["world_size"] == 2

    one = tmp_path / "one"
    run("train.py", ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--run-dir", str(one),
                     *train_overrides(shards)], env=netns_slurm)
    assert_world(one, 1)
    difference = max_abs_difference(weights(one), weights(run_dir))
    assert difference < 1e-6, f"max |one process - two nodes| = {difference:.3g}"
    first = [next(json.loads(line)["train/loss"]
                  for line in (d / "metrics.jsonl").read_text().splitlines()
                  if "train/loss" in line) for d in (one, run_dir)]
    assert first[0] == pytest.approx(first[1], rel=1e-6)


def training_processes(job: str) -> dict[str, int]:
    """{node name: pid} of the training processes (launch/train.py under accelerate's launcher,
    not the launcher itself) of SLURM job `job`, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if (not any(a.endswith("launch/train.py") for a in argv)
                    or "accelerate.commands.launch" in argv):
                continue
            environ = dict(item.split("=", 1) for item in
                           (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                           if "=" in item)
        except OSError:  # ended while we looked
            continue
        if environ.get("SLURM_JOB_ID") == job:
            found[environ.get("SLURMD_NODENAME")] = int(entry.name)
    return found


def network_namespace(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


# node 2: the main node's rank sees its peer's connection reset; node 1: the rank beside the
# launcher that holds torchrun's store dies, and node 2 is the one left waiting
@pytest.mark.parametrize("killed", [2, 1], ids=["node2", "node1"])
def test_a_node_killed_mid_run_fails_the_job_fast_and_the_requeued_job_resumes_exactly(
        netns_slurm, shards, two_node_run, tmp_path, killed):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(netns_slurm, run_dir, log, shards)
    wait_for(lambda: (latest_checkpoint(run_dir) is not None
                      or job_states(netns_slurm, job).get(job) in TERMINAL),
             180, "the first checkpoint")
    processes = training_processes(job)
    assert set(processes) == set(NODES), (processes, log.read_text()[-3000:])
    for i in (1, 2):  # each runs inside its node's namespace (ip netns keeps it at /run/netns)
        assert (network_namespace(processes[f"{PREFIX}{i}"])
                == os.stat(f"/run/netns/{PREFIX}-n{i}").st_ino)
    os.kill(processes[f"{PREFIX}{killed}"], signal.SIGKILL)
    killed_at = time.monotonic()

    states = wait_done(netns_slurm, job, tasks=1, timeout=KILL_BOUND_S, logs=[log])
    ended_after = time.monotonic() - killed_at
    print(f"job {job} ended {ended_after:.1f} s after SIGKILL to node {killed}'s rank")
    assert states[job] == "FAILED", (states, f"{ended_after:.1f} s", log.read_text()[-4000:])
    assert ended_after < KILL_BOUND_S, f"the job ended {ended_after:.1f} s after the kill"
    assert not (run_dir / "model.safetensors").exists(), "the run finished before the kill"
    saved = load_checkpoint(latest_checkpoint(run_dir))  # intact: loads and holds a whole state
    stopped_at = saved["step"]
    assert 5 <= stopped_at < STEPS and stopped_at % 5 == 0 and saved["model"]

    # the failed job requeued (scontrol requeue, as an operator or a retry policy would): the
    # same job id, the same command, --resume auto: it continues from the newest checkpoint
    slurm_cmd(netns_slurm, "scontrol", "requeue", job)
    release_requeued(netns_slurm, job)
    states = wait_done(netns_slurm, job, tasks=1, timeout=300, logs=[log])
    assert states[job] == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text().split("(restart 1)")[1]  # the requeued instance's output
    assert_two_namespaced_machines(text)
    checkpoint = run_dir / "checkpoints" / f"step-{stopped_at:08d}.pt"
    assert f"resumed from {checkpoint} at step {stopped_at}" in text, text[-3000:]

    assert train_steps(run_dir) == list(range(1, STEPS + 1))  # none lost, none repeated
    resumed, straight = weights(run_dir), weights(two_node_run[0])
    assert resumed.keys() == straight.keys()
    for name in resumed:
        assert torch.equal(resumed[name], straight[name]), (
            name, f"max diff {max_abs_difference(resumed, straight):.3g}")
