"""Shared fixtures for the data tests (the shared Omniglot copy and shard sets packed once), and
the two test tiers: `-m "not integration"` is the fast unit tier, `-m integration` the tests that
start processes (`accelerate launch`, subprocesses, a SLURM cluster, benchmark scripts)."""

import fcntl
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# OpenMP threads that spin while they wait (libgomp's default) fight any other busy process for
# the cores: with a training run on one of two cores, the unit tier took 8 minutes instead of
# under 1. Passive waiting for this process only: libgomp reads the variable once, as torch loads
# it, so it is set for that import and taken back; the processes the tests start inherit none.
# Under pytest-xdist (`-n 2`) the workers' processes share the cores with each other, so there
# they inherit the passive policy too.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch  # noqa: F401
    if XDIST_WORKERS == 1:
        del os.environ["OMP_WAIT_POLICY"]
if XDIST_WORKERS > 1:  # a worker's in-process tests: its share of the cores, not all of them
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // XDIST_WORKERS))

from fsl_dist.data import shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# FSL_OMNIGLOT points elsewhere, for a clone whose parent folder has no shared/.
SHARED_OMNIGLOT = Path(os.environ.get("FSL_OMNIGLOT")
                       or REPO.parent / "shared" / "data" / "omniglot")
ZIPS = ("images_background.zip", "images_evaluation.zip")


@pytest.fixture(scope="session")
def omniglot_source() -> Path:
    """The official Omniglot zips beside the project (../shared/data/omniglot, or FSL_OMNIGLOT).

    Without them the data tests skip, unless FSL_REQUIRE_DATA=1 (set by .ci/run): then they
    fail, so that a CI run from a clone that cannot see the data does not pass on skips."""
    missing = [name for name in ZIPS if not (SHARED_OMNIGLOT / name).is_file()]
    if missing:
        reason = (f"Omniglot source not found: {SHARED_OMNIGLOT} lacks {', '.join(missing)}; "
                  f"set FSL_OMNIGLOT to the folder holding {' and '.join(ZIPS)}")
        if os.environ.get("FSL_REQUIRE_DATA") == "1":
            pytest.fail(f"FSL_REQUIRE_DATA=1 but {reason}")
        pytest.skip(reason)
    return SHARED_OMNIGLOT


@pytest.fixture(scope="session")
def packed(omniglot_source, tmp_path_factory):
    """packed(split) -> shard folder of that split, packed at most once per test session."""
    made: dict[str, Path] = {}

    def get(split: str) -> Path:
        if split not in made:
            out = tmp_path_factory.mktemp(f"packed-{split}") / f"omniglot-{split}"
            made[split] = shards.pack_omniglot(omniglot_source, split, out, download=False)
        return made[split]

    return get


# Modules in which every test starts processes: marked here, in one place, rather than in each
# file. Tests that start processes in other modules carry @pytest.mark.integration themselves.
INTEGRATION_MODULES = frozenset({
    "test_bench_quick.py",  # launch/bench.py and bench_scaling.py as scripts
    "test_cpu_malloc.py",  # a fresh interpreter per allocator setting
    "test_meta_learns_folder.py",
    "test_meta_learns_omniglot.py",
    "test_predict_trained.py",  # training runs, fsl-predict as a process
    "test_pretrain.py",  # fsl-pretrain processes, one and two ranks, resumed
    "test_run_faults.py",  # trainer processes, a tmpfs filled up
    "test_run_resume.py",  # trainer processes resumed, stopped, refused
    "test_slurm.py",  # a real SLURM cluster
    "test_slurm_netns.py",  # a two-node SLURM cluster in network namespaces
    "test_train_distributed.py",
    "test_train_end_to_end.py",
    "test_train_folder.py",
    "test_write_faults.py",  # unprivileged processes, read-only and full mounts
})


# Modules that start SLURM clusters (and use fixed folders under /tmp): under `-n 2` one of them
# runs at a time, whichever worker has it (`--dist loadscope` in setup.cfg keeps a module on one
# worker; xdist 3.8's `loadgroup` ignores groups under pytest 9).
SLURM_MODULES = frozenset({"test_slurm.py", "test_slurm_netns.py"})


@pytest.fixture(scope="module", autouse=True)
def _one_slurm_module_at_a_time(request):
    if request.path.name not in SLURM_MODULES:
        yield
        return
    with open(Path(tempfile.gettempdir()) / "fsl_dist-slurm-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the module ends or its worker dies
        yield


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)


# Probes that libraries run once and cache, not the tests' own processes: matplotlib's font list
# (fc-list), platform.processor() (uname) and ctypes.util.find_library (ldconfig).
LIBRARY_PROBES = frozenset({"fc-list", "uname", "ldconfig"})


@pytest.fixture(autouse=True)
def _unit_tests_start_no_processes(request, monkeypatch):
    """A test outside the integration tier that starts a process fails at once and says so,
    so the fast tier stays fast. Failed is a BaseException: library code catching Exception
    around a subprocess call cannot hide it."""
    if request.node.get_closest_marker("integration") is not None:
        return
    popen_init = subprocess.Popen.__init__

    def refuse(what):
        pytest.fail(f"{request.node.nodeid} starts a process ({what}); mark it @pytest.mark."
                    f"integration (or list its module in conftest.py's INTEGRATION_MODULES)")

    def guarded_popen_init(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        if os.path.basename(os.fsdecode(argv[0])) not in LIBRARY_PROBES:
            refuse(" ".join(map(os.fsdecode, argv))[:200])
        popen_init(self, args, *rest, **kwargs)

    # Popen.__init__ is what subprocess.run/call/check_output and os.popen go through.
    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_popen_init)
    monkeypatch.setattr(os, "system", refuse)
