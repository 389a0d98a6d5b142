"""The CPU allocator settings (fsl_dist/cpu_malloc.py): they take effect, they cut the page
faults of a real second-order meta-step, and they never override the user's own choice; a
training command on CPU starts again under the start-up tunables, which take effect too.
Page faults are counted by the kernel (getrusage), not timed: no speed is asserted here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsl_dist import cpu_malloc
from fsl_dist.cpu_malloc import (
    START_TUNABLES,
    chosen_allocator,
    preloaded_tcmalloc,
    reason_to_leave_alone,
    start_environment,
    started_tuned,
    tcmalloc_path,
)

from launching import require_tcmalloc

ROOT = Path(__file__).resolve().parents[1]

# Second-order Conv-4 MAML meta-steps (5-way 1-shot 15-query, 4 tasks, 2 worker threads, the
# trainer's CPU path): 2 to warm up, then the fewest minor page faults of one of the next 4 (the
# fewest: a step that happens to open a new heap for a thread is not the steady state).
STEPS = r"""
import json, resource, sys, torch
from fsl_dist.cpu_malloc import tune_cpu_malloc
from fsl_dist.meta import InnerLoopSpec, meta_backward
from fsl_dist.models import build_model
outcome = tune_cpu_malloc() if sys.argv[1] == "tune" else "untouched"
if sys.argv[2] == "outcome only":
    print(json.dumps({"outcome": outcome}))
    sys.exit()
torch.manual_seed(0)
torch.set_num_threads(2)
model = build_model("cnn", 5)
g = torch.Generator().manual_seed(0)
tasks = {"support_x": (torch.rand(4, 5, 1, 28, 28, generator=g) > 0.8).float(),
         "support_y": torch.arange(5).expand(4, 5).contiguous(),
         "query_x": (torch.rand(4, 75, 1, 28, 28, generator=g) > 0.8).float(),
         "query_y": torch.arange(5).repeat(15).expand(4, 75).contiguous()}
def step():
    model.zero_grad(set_to_none=True)
    meta_backward(model, tasks, InnerLoopSpec("maml", inner_steps=1, inner_lr=0.4))
step(); step()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"outcome": outcome, "faults": min(faults)}))
"""


def run_steps(mode: str, what: str = "faults", **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("LD_PRELOAD", "GLIBC_TUNABLES"))}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", STEPS, mode, what], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_tuning_cuts_the_page_faults_of_a_meta_step():
    default, tuned = run_steps("keep"), run_steps("tune")
    assert tuned["outcome"] == "tuned"
    # measured here (fewest of 4 steps, beside a training run): 36,767-71,068 by default, 15-472
    # tuned, in three runs
    assert tuned["faults"] < 0.25 * default["faults"], (default, tuned)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("variable, value", [("MALLOC_TRIM_THRESHOLD_", "131072"),
                                             ("MALLOC_ARENA_MAX", "2"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.top_pad=0")])
def test_the_users_own_malloc_settings_are_left_alone(variable, value):
    result = run_steps("tune", "outcome only", **{variable: value})
    assert result["outcome"] == f"left as is: the environment sets {variable}"


# A training command's first step (fsl_dist/cli/starting.py), then glibc's per-thread cache seen
# from inside: of 40 freed 1000-byte chunks, how many went back to the heap (tcache keeps 7).
RESTART = r"""
import ctypes, json, os, sys
from fsl_dist.cli.starting import restart_for_cpu_training
from fsl_dist.cpu_malloc import _MallInfo2, loaded_tcmalloc
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "argv": sys.argv[1:], "tcmalloc": loaded_tcmalloc()}), flush=True)
restart_for_cpu_training(sys.argv[1:])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.mallinfo2.restype = _MallInfo2
chunks = [libc.malloc(1000) for _ in range(40)]
guards = [libc.malloc(1000) for _ in range(40)]  # keep the freed chunks apart
before = libc.mallinfo2().uordblks
for chunk in chunks:
    libc.free(chunk)
print(json.dumps({"freed": round((before - libc.mallinfo2().uordblks) / 1008)}))
"""


def restart(*argv: str, **env_extra) -> list[dict]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("MALLOC_", "FSL_DIST_")) or k in ("LD_PRELOAD", "GLIBC_TUNABLES"))}
    env.update(env_extra, PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true")
    out = subprocess.run([sys.executable, "-c", RESTART, *argv], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's tunables: Linux only")
def test_a_cpu_training_command_starts_again_under_the_start_tunables():
    first, again, heap = restart("--config", "cnn_maml", "train.steps=3", "--quiet")
    assert first["tunables"] is None and again["tunables"] == START_TUNABLES
    assert again["tcmalloc"] is None  # auto, without a memory budget: glibc
    assert again["pid"] == first["pid"] and again["argv"] == first["argv"]
    assert heap["freed"] == 40  # no per-thread cache keeps any of them


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's tunables: Linux only")
@pytest.mark.parametrize("argv, env_extra", [
    (["--config", "cnn_maml", "train.tune_cpu_malloc=false"], {}),
    (["--config", "cnn_maml"], {"MALLOC_ARENA_MAX": "2"}),
    (["--config", "cnn_maml"], {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}),
    (["--config", "no_such_config"], {}),  # the command itself says what is wrong
])
def test_no_restart_when_the_setting_is_off_or_the_user_chose(argv, env_extra):
    first, heap = restart(*argv, **env_extra)
    assert first["tunables"] == env_extra.get("GLIBC_TUNABLES")
    assert heap["freed"] == (37 if env_extra.get("GLIBC_TUNABLES") else 33)


def test_start_tunables_are_fsl_dists_own_and_join_the_users_other_tunables():
    env = start_environment({"PATH": "/usr/bin"})
    assert env["GLIBC_TUNABLES"] == START_TUNABLES and started_tuned(env)
    assert reason_to_leave_alone(env) is None  # not taken for the user's choice
    assert start_environment(env) is None  # there already
    joined = start_environment({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert joined["GLIBC_TUNABLES"] == f"glibc.cpu.hwcaps=-AVX512F:{START_TUNABLES}"
    assert started_tuned(joined)
    for variable, value in (("MALLOC_TRIM_THRESHOLD_", "131072"), ("LD_PRELOAD", "libjemalloc.so"),
                            ("GLIBC_TUNABLES", "glibc.malloc.top_pad=0")):
        assert start_environment({variable: value}) is None


def test_with_cpu_allocator_tcmalloc_a_cpu_training_command_starts_again_under_it():
    require_tcmalloc()
    first, again, _ = restart("--config", "cnn_maml", "train.cpu_allocator=tcmalloc")
    assert first["tcmalloc"] is None
    assert again["tcmalloc"] == os.path.realpath(tcmalloc_path())  # maps name the file
    assert again["pid"] == first["pid"] and again["argv"] == first["argv"]
    assert again["tunables"] is None  # glibc's are for glibc's malloc


def test_by_default_a_budgeted_cpu_training_command_starts_again_under_tcmalloc():
    require_tcmalloc()
    first, again, _ = restart("--config", "cnn_maml", "train.memory_budget_gb=2")
    assert first["tcmalloc"] is None
    assert again["tcmalloc"] == os.path.realpath(tcmalloc_path())
    assert again["pid"] == first["pid"] and again["argv"] == first["argv"]


def test_auto_is_tcmalloc_only_with_a_memory_budget_and_where_found(monkeypatch):
    monkeypatch.setattr(cpu_malloc, "tcmalloc_path", lambda env=None: "/opt/libtcmalloc.so.4")
    assert chosen_allocator("auto", budgeted=True) == "tcmalloc"
    assert chosen_allocator("auto", budgeted=False) == "glibc"
    assert chosen_allocator("glibc", budgeted=True) == "glibc"  # named: as named
    assert chosen_allocator("tcmalloc", budgeted=False) == "tcmalloc"
    monkeypatch.setattr(cpu_malloc, "tcmalloc_path", lambda env=None: None)
    assert chosen_allocator("auto", budgeted=True) == "glibc"  # not found: no error, glibc
    assert chosen_allocator("tcmalloc", budgeted=True) == "tcmalloc"  # trainer: missing


def test_the_bench_machine_line_says_which_rows_run_under_tcmalloc(monkeypatch):
    import torch

    from fsl_dist.bench import machine

    for module in (cpu_malloc, machine):
        monkeypatch.setattr(module, "tcmalloc_path", lambda env=None: "/opt/libtcmalloc.so.4")
    monkeypatch.setattr(machine, "reason_to_leave_alone", lambda: None)
    cpu = torch.device("cpu")
    assert machine.machine_line(cpu, 2, "auto").endswith(
        "start tunables, memory-plan rows under tcmalloc (/opt/libtcmalloc.so.4)")
    assert machine.machine_line(cpu, 2, "tcmalloc").endswith(
        "fsl_dist rows under tcmalloc (/opt/libtcmalloc.so.4)")
    for module in (cpu_malloc, machine):
        monkeypatch.setattr(module, "tcmalloc_path", lambda env=None: None)
    assert machine.machine_line(cpu, 2, "auto").endswith("glibc malloc settings and start tunables")


def test_start_environment_preloads_tcmalloc_only_where_asked_and_found(monkeypatch):
    found = "/opt/lib/libtcmalloc_minimal.so.4"
    monkeypatch.setattr(cpu_malloc, "tcmalloc_path", lambda env=None: found)
    env = start_environment({"PATH": "/usr/bin"}, allocator="tcmalloc")
    assert env["LD_PRELOAD"] == found and preloaded_tcmalloc(env)
    assert "GLIBC_TUNABLES" not in env and env["TCMALLOC_RELEASE_RATE"] == "0"
    assert reason_to_leave_alone(env).startswith("fsl_dist started it with tcmalloc")
    assert start_environment(env, allocator="tcmalloc") is None  # there already
    # the user's own preload, allocator settings or report threshold are theirs
    assert start_environment({"LD_PRELOAD": "/x/libjemalloc.so.2"}, allocator="tcmalloc") is None
    assert start_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"},
                             allocator="tcmalloc")["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"
    monkeypatch.setattr(cpu_malloc, "tcmalloc_path", lambda env=None: None)
    assert start_environment({"PATH": "/usr/bin"}, allocator="tcmalloc") is None


def test_tcmalloc_asked_for_and_missing_is_one_line_that_says_what_to_do(monkeypatch):
    for variable in ("LD_PRELOAD", cpu_malloc.PRELOADED_BY_FSL_DIST):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(cpu_malloc, "tcmalloc_path", lambda env=None: None)
    line = cpu_malloc.tcmalloc_missing()
    assert "`train.cpu_allocator` = 'tcmalloc'" in line
    assert "apt install libtcmalloc-minimal4" in line
    assert "train.cpu_allocator=glibc" in line and "\n" not in line
    monkeypatch.setattr(cpu_malloc, "tcmalloc_path", lambda env=None: "/opt/libtcmalloc.so.4")
    line = cpu_malloc.tcmalloc_missing()
    assert "did not start with it" in line and "LD_PRELOAD=/opt/libtcmalloc.so.4" in line
