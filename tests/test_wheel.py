"""The wheel works outside the repo (issue 29, item 3): built from this checkout, installed into
a fresh venv in a temporary folder, and run from that folder (not the repo), its console
commands pack Omniglot from the local zips, train a shipped config by its name, evaluate, and
classify drawings from the zips with fsl-predict.

Installing torch into every fresh venv would take minutes: the fresh venv sees the test venv's
dependencies through a .pth file instead. A folder a .pth adds is not searched for further .pth
files, so an editable fsl_dist of the test venv stays invisible (checked below).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from fsl_dist.cpu_malloc import START_TUNABLES

from launching import ROOT, child_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# What the build reads; copied to a temporary folder, so that setuptools' build/ folder in the
# checkout (which keeps modules deleted since) can never leak stale files into the wheel.
BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in",
                "fsl_dist", "configs")
SYSTEMS = ("cnn_maml", "cnn_boil", "resnet_maml", "resnet_boil")
# A few steps on small tasks and a tiny evaluation: the commands, not the learning, are tested.
TINY = ["task.k_shot=1", "task.q_query=2", "model.width=8", "train.steps=3",
        "train.meta_batch_size=2", "train.log_every=1", "train.eval_every=3",
        "train.checkpoint_every=3", "eval.val_episodes=4", "eval.episodes=10",
        "eval.batch_size=10", "logging.wandb=false"]
PREDICT_MODULE = ROOT / "fsl_dist" / "cli" / "predict.py"
COMMANDS = ("fsl-train", "fsl-pretrain", "fsl-pack", "fsl-evaluate", "fsl-predict", "fsl-sweep",
            "fsl-compare", "fsl-bench", "fsl-multinode")


@dataclass
class Installed:
    venv: Path
    work: Path  # the folder outside the repo that every command runs in
    env: dict

    def run(self, command: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`command` (a console script or python of the fresh venv) run in the work folder;
        fails the test, with its output, unless it exits 0."""
        argv = [str(self.venv / "bin" / command), *map(str, args)]
        result = subprocess.run(argv, cwd=self.work, env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, (f"{command} {' '.join(argv[1:])} exited "
                                        f"{result.returncode}\n--- stdout\n{result.stdout[-3000:]}"
                                        f"\n--- stderr\n{result.stderr[-5000:]}")
        return result


def build_wheel(out: Path) -> Path:
    source = out / "source"
    source.mkdir(parents=True)
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    return next((out / "dist").glob("fsl_dist-*.whl"))


def fresh_venv(venv: Path) -> Path:
    """A venv without packages of its own that sees this venv's site-packages through a .pth."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    Path(site.stdout.strip(), "test_venv_dependencies.pth").write_text("\n".join(ours) + "\n")
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    home = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(home / "build")
    python = fresh_venv(home / "venv")
    env = child_env()
    for leak in ("PYTHONPATH", "VIRTUAL_ENV"):  # either would bring this checkout's fsl_dist
        env.pop(leak, None)
    env["PATH"] = f"{python.parent}:{env.get('PATH', '')}"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, env=env, capture_output=True, timeout=300)
    (home / "work").mkdir()
    return Installed(venv=home / "venv", work=home / "work", env=env)


@pytest.fixture(scope="module")
def trained(installed, omniglot_source) -> Path:
    """Shards packed and cnn_maml trained by the installed commands; the run folder."""
    installed.run("fsl-pack", "omniglot", "--source", omniglot_source.resolve(), "--split",
                  "futurama", "--out", "shards/omniglot-futurama")
    installed.run("fsl-train", "--config", "cnn_maml", *TINY)
    return installed.work / "runs" / "cnn_maml-0"


def test_installed_fsl_train_on_cpu_ran_under_the_start_tunables(trained):
    info = json.loads((trained / "run.json").read_text())
    assert info.get("glibc_tunables") == (START_TUNABLES if info["device"] == "cpu" else None)


def test_the_venv_imports_the_installed_package_with_its_configs(installed):
    probe = ("import json, fsl_dist; from fsl_dist.config import find_config, load_config; "
             f"print(json.dumps([fsl_dist.__file__] + [str(find_config(n)) for n in {SYSTEMS}]"
             f" + [load_config(n).name for n in {SYSTEMS}]))")
    package, *found = json.loads(installed.run("python", "-c", probe).stdout)
    site = installed.venv / "lib"
    assert Path(package).is_relative_to(site), f"{package} is not the wheel's fsl_dist"
    configs = found[:len(SYSTEMS)]
    assert [Path(c).relative_to(Path(package).parent).as_posix() for c in configs] == [
        f"configs/{name}.yaml" for name in SYSTEMS]
    assert found[len(SYSTEMS):] == list(SYSTEMS)  # run folders named as from the repo's files


def test_the_commands_start_as_modules_and_through_accelerate_launch(installed):
    assert "shipped config" in installed.run("python", "-m", "fsl_dist.cli.train", "--help").stdout
    launched = installed.run("python", "-m", "accelerate.commands.launch", "--num_processes", "1",
                             "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no", "-m", "fsl_dist.cli.train", "--help")
    assert "shipped config" in launched.stdout


def test_every_console_command_is_installed_and_loads(installed):
    # One process loads every entry point's main (not one interpreter and torch import each).
    absent = "" if PREDICT_MODULE.is_file() else "fsl-predict"
    probe = ("import json; from importlib.metadata import distribution; "
             "commands = [e for e in distribution('fsl_dist').entry_points "
             "if e.group == 'console_scripts']; "
             f"[e.load() for e in commands if e.name != {absent!r}]; "
             "print(json.dumps(sorted(e.name for e in commands)))")
    assert json.loads(installed.run("python", "-c", probe).stdout) == sorted(COMMANDS)
    assert all((installed.venv / "bin" / command).is_file() for command in COMMANDS)


def test_fsl_train_runs_a_shipped_config_by_name_in_the_current_folder(trained, installed):
    assert trained.is_relative_to(installed.work)
    for produced in ("config.yaml", "metrics.jsonl", "model.safetensors", "eval.json"):
        assert (trained / produced).is_file(), produced
    assert (installed.work / "shards" / "omniglot-futurama" / "manifest.json").is_file()


def test_fsl_evaluate_scores_the_run(trained, installed):
    result = installed.run("fsl-evaluate", "--run-dir", trained.relative_to(installed.work),
                           "--episodes", "20")
    written = json.loads((trained / "eval-test.json").read_text())
    assert written["episodes"] == 20 and 0 <= written["mean"] <= 100
    assert json.loads(result.stdout)["mean"] == written["mean"]


def test_an_unknown_config_name_exits_2_naming_it_and_the_shipped_names(installed):
    result = subprocess.run([str(installed.venv / "bin" / "fsl-train"), "--config", "cnn_mamll"],
                            cwd=installed.work, env=installed.env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: config cnn_mamll does not exist"), result.stderr
    assert "cnn_maml, " in result.stderr and len(result.stderr.splitlines()) == 1


def test_fsl_sweep_lists_a_shipped_sweep_by_name(installed):
    listing = installed.run("fsl-sweep", "list", "cnn_shots").stdout
    assert "cnn_maml-k_shot=1-s0" in listing and "resnet" not in listing


def write_futurama_drawings(zips: Path, folder: Path, per_class: int) -> None:
    """The first `per_class` drawings of five Futurama characters (the futurama split's test
    alphabet) from the source zip, one folder per character, as a user's images would come."""
    with zipfile.ZipFile(zips / "images_background.zip") as archive:
        names = sorted(n for n in archive.namelist() if "/Futurama/" in n and n.endswith(".png"))
        for character in sorted({PurePosixPath(n).parent.name for n in names})[:5]:
            drawings = [n for n in names if PurePosixPath(n).parent.name == character]
            (folder / character).mkdir(parents=True)
            for name in drawings[:per_class]:
                (folder / character / PurePosixPath(name).name).write_bytes(archive.read(name))


@pytest.mark.skipif(not PREDICT_MODULE.is_file(),
                    reason="fsl_dist/cli/predict.py (fsl-predict) is not in this checkout")
def test_fsl_predict_classifies_new_drawings_with_the_trained_run(trained, installed,
                                                                  omniglot_source):
    write_futurama_drawings(omniglot_source, installed.work / "support", per_class=1)
    write_futurama_drawings(omniglot_source, installed.work / "query", per_class=3)
    result = installed.run("fsl-predict", "--model", trained.relative_to(installed.work),
                           "--support", "support", "--query", "query", "--out", "labels.csv")
    rows = list(csv.DictReader((installed.work / "labels.csv").open()))
    characters = {path.name for path in (installed.work / "support").iterdir()}
    assert len(rows) == 15 and {row["predicted"] for row in rows} <= characters
    assert "accuracy" in result.stdout + result.stderr  # query folders named after the classes
