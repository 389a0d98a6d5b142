"""The run folder and the data a run needs.

    runs/<config name>-<seed>/
        config.yaml          the resolved config (load_config reads it back)
        run.json             world size, device, precision, package versions, git commit, W&B id,
                             the data (data set, channels, image size, shard format version),
                             on CPU the GLIBC_TUNABLES the process started with
        metrics.jsonl        one JSON row per logged step
        checkpoints/         step-NNNNNNNN.pt, the newest few
        wandb/               W&B's own files (offline-run-*/run-<id>.wandb without an API key)
        model.safetensors    final weights and model.yaml, their description: the trained-model
        model.yaml           format (fsl_dist/trained.py)
        eval.json            the final held-out evaluation
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from fsl_dist import checkpoint as ckpt
from fsl_dist import runfolder
from fsl_dist.config import Config, ConfigError, save_config
from fsl_dist.cpu_malloc import loaded_tcmalloc
from fsl_dist.data.episodes import TaskSpec, make_tasks
from fsl_dist.data.shards import (
    ShardError,
    classes_with_at_least,
    load_manifest,
    memory_budget_problem,
    pack_omniglot,
)
from fsl_dist.evaluate import combine_seeds, evaluate, evaluate_episodes
from fsl_dist.finetune import method_score
from fsl_dist.io import WriteFailure, atomic_write_json
from fsl_dist.resume import recorded_changes
from fsl_dist.trained import DESCRIPTION, data_facts

PACKAGES = ("fsl_dist", "torch", "accelerate", "webdataset", "wandb", "numpy", "safetensors")


# ---------------------------------------------------------------- data


def pack_command(cfg: Config) -> str:
    if cfg.data.dataset == "folder":
        return f"python launch/pack.py folder ROOT --out {cfg.data.shards} --size 84"
    if cfg.data.dataset != "omniglot":  # a benchmark: its subcommand has the right defaults
        return f"python launch/pack.py {cfg.data.dataset} ROOT --out {cfg.data.shards}"
    source = f" --source {cfg.data.source}" if cfg.data.source else ""
    return (f"python launch/pack.py omniglot{source} --split {cfg.data.split} "
            f"--out {cfg.data.shards} --size {cfg.data.image_size}")


def ensure_shards(cfg: Config, dist, quiet: bool = False) -> dict:
    """Make sure the configured shard set exists and matches the config, and return its
    manifest. When an Omniglot set is missing, the main process packs it (from `data.source`,
    else the checked download cache) while the others wait; a failure is reported on every rank
    with the command that makes the shards. Folder sets are only ever made by launch/pack.py.
    `quiet`: no packing progress bar."""
    manifest = Path(cfg.data.shards) / "manifest.json"
    if not manifest.is_file() and cfg.data.dataset != "omniglot":
        raise ShardError(f"no shard set at {cfg.data.shards} (missing {manifest}); make it with:"
                         f"\n    {pack_command(cfg)}")
    if not manifest.is_file():
        def pack():
            dist.print(f"no shards at {cfg.data.shards}: packing the {cfg.data.split} split "
                       f"from {cfg.data.source or 'the official Omniglot download'}")
            try:
                pack_omniglot(cfg.data.source, cfg.data.split, cfg.data.shards,
                              size=cfg.data.image_size, quiet=quiet)
            except WriteFailure:  # no space, no permission...: its own line and exit code
                raise
            except Exception as err:  # noqa: BLE001 - reported to every rank, not swallowed
                raise ShardError(f"no shard set at {cfg.data.shards} (missing {manifest}) and "
                                 f"packing it failed:\n    {type(err).__name__}: {err}\nmake "
                                 f"it with:\n    {pack_command(cfg)}") from None

        dist.on_main(pack, (WriteFailure, ShardError))
    packed = load_manifest(cfg.data.shards)
    if packed["dataset"] != cfg.data.dataset:
        raise ConfigError(f"`data.dataset` = {cfg.data.dataset!r} but {manifest} holds "
                          f"{packed['dataset']!r} shards; set data.dataset={packed['dataset']} "
                          f"or point data.shards at {cfg.data.dataset} shards")
    if packed["dataset"] == "omniglot" and packed["split"] != cfg.data.split:
        raise ConfigError(f"`data.split` = {cfg.data.split!r} but {manifest} was packed with split "
                          f"{packed['split']!r}; point data.shards at a {cfg.data.split} shard set")
    if cfg.data.rotate and not packed.get("rotate", False):
        dist.print(f"warning: data.rotate is on but the {packed['dataset']} shards at "
                   f"{cfg.data.shards} are marked as not meant for rotation; set data.rotate=false")
    check_tasks_fit(cfg, packed)
    check_memory_budget(cfg, packed)
    return packed


def check_tasks_fit(cfg: Config, manifest: dict) -> None:
    """N-way and K+Q against every part of the shard set (the test part is used only at the end,
    so it is checked now rather than after hours of training)."""
    needed = cfg.task.k_shot + cfg.task.q_query
    for part, entry in manifest["splits"].items():
        n_way, key = ((cfg.task.n_way, "task.n_way") if part == "train" or cfg.eval.n_way is None
                      else (cfg.eval.n_way, "eval.n_way"))
        if n_way > entry["classes"]:
            raise ConfigError(f"`{key}` = {n_way} is larger than the "
                              f"{entry['classes']} classes of the {part} part of "
                              f"{cfg.data.shards}")
        qualifying = classes_with_at_least(entry["images_per_class"], needed)
        if qualifying < n_way:
            raise ConfigError(f"`task.k_shot` + `task.q_query` = {cfg.task.k_shot} + "
                              f"{cfg.task.q_query} = {needed} images per class: only {qualifying} "
                              f"of the {entry['classes']} classes of the {part} part of "
                              f"{cfg.data.shards} hold that many, fewer than `{key}` = "
                              f"{n_way}")


def check_memory_budget(cfg: Config, manifest: dict) -> None:
    """The parts every process loads into memory (train only in memory mode; validation and the
    held-out part always), against `data.memory_budget_gb`, from the manifest, before loading."""
    streaming = cfg.data.mode == "stream"
    parts = ["val", cfg.eval.part] if streaming else ["train", "val", cfg.eval.part]
    problem = memory_budget_problem(manifest, parts, cfg.data.memory_budget_gb, cfg.data.shards,
                                    streaming=streaming)
    if problem:
        raise ConfigError(problem)


# ---------------------------------------------------------------- run.json, model files


def git_commit() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_info(cfg: Config, run_dir: Path, dist, precision: str,
                   wandb_id: Optional[str], manifest: dict, history: Optional[dict] = None,
                   memory_plan: Optional[dict] = None) -> None:
    """config.yaml and run.json; ``history`` (resume.history: the segments, from which step on
    each ran, and the config changes of resumes) goes into run.json, and so does
    ``memory_plan`` (this start's, ``memory_plan.plan_memory``'s record) when there is one."""
    save_config(cfg, run_dir / "config.yaml")
    device = dist.device
    info = {
        "config": cfg.name,
        "world_size": dist.world_size,
        "backend": dist.backend,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "precision": precision,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "wandb_id": wandb_id,
        "data": data_facts(manifest),
        **(history or {}),
    }
    if device.type == "cpu":  # the allocator's start-up settings (fsl_dist/cpu_malloc.py)
        info["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
        tcmalloc, preload = loaded_tcmalloc(), os.environ.get("LD_PRELOAD")
        info["cpu_allocator"] = (f"tcmalloc {tcmalloc}" if tcmalloc else
                                 f"LD_PRELOAD {preload}" if preload else "glibc")
    if memory_plan is not None:
        info["memory_plan"] = memory_plan
    atomic_write_json(run_dir / "run.json", info)


def training_progress(run_dir: Path, weights: Path, cfg: Config) -> dict:
    """How far the training of ``weights`` got: ``trained_steps`` (None if unknown) of
    ``planned_steps``, whether a trainer holds the run folder now (``training_in_progress``),
    and the config changes run.json records (``config_changes``, only if any). A checkpoint's
    step is in its name; the exported model's in model.yaml."""
    step = None
    name = ckpt.step_of(weights)
    if name is not None:
        step = name
    elif (run_dir / DESCRIPTION).is_file():
        step = yaml.safe_load((run_dir / DESCRIPTION).read_text()).get("step")
    return {"trained_steps": step, "planned_steps": cfg.train.steps,
            "training_in_progress": runfolder.holder(run_dir) is not None,
            **({"config_changes": changes} if (changes := recorded_changes(run_dir)) else {})}


# ---------------------------------------------------------------- held-out evaluation


def episode_shape(n_way: int, k_shot: int, q_query: int) -> TaskSpec:
    try:
        return TaskSpec(n_way, k_shot, q_query, rotate=False)
    except ValueError as err:
        raise ConfigError(f"{err} (shots {k_shot}, queries {q_query})") from err


def evaluate_held_out(learner, cfg: Config, dist, run_dir: Path, *, precision: str,
                      episodes: Optional[int] = None, shots: Optional[int] = None,
                      queries: Optional[int] = None, part: Optional[str] = None,
                      inner_steps: Optional[int] = None,
                      out_name: str = "eval.json", weights: Optional[Path] = None,
                      seeds: Optional[Sequence[int]] = None, quiet: bool = False,
                      method: str = "adapt") -> dict:
    """Evaluate ``learner`` (fsl_dist/learners, bound to its model) on `part` (default
    eval.part) and write `out_name` in the run folder; `weights`,
    the file the model came from, is recorded relative to the run folder; `shots` and `queries`
    replace the trained K and Q per class (comparing runs trained with different Q needs one
    test protocol). With two or more
    `seeds`, `episodes` are drawn for each episode seed and the result is `combine_seeds`'.
    `method`: adapt (the learner's own) or one of fsl_dist.finetune.METHODS on the frozen body
    of ``learner.model`` (nearest centroid, Baseline, Baseline++; ``finetune.FrozenBody`` holds a
    model that has no learner). `quiet`: no progress bar."""
    part = part or cfg.eval.part
    episodes = episodes or cfg.eval.episodes
    k_shot = cfg.task.k_shot if shots is None else shots
    q_query = cfg.task.q_query if queries is None else queries
    n_way = cfg.evaluation_way()
    tasks = episode_shape(n_way, k_shot, q_query)

    def one_seed(seed: int) -> dict:
        try:
            source = make_tasks(cfg.data.shards, part, tasks, seed=seed,
                                memory_budget_gb=cfg.data.memory_budget_gb)
        except ValueError as err:  # episodes the shards cannot fill: input, not a bug
            raise ConfigError(f"evaluating {k_shot}-shot {q_query}-query episodes: {err}") from err
        desc = f"{part} (seed {seed})" if len(seeds) > 1 else part
        if method == "adapt":
            result = evaluate(learner, source, episodes=episodes, dist=dist,
                              precision=precision, batch_size=cfg.eval.batch_size,
                              inner_steps=inner_steps, quiet=quiet, desc=desc)
        else:
            result = evaluate_episodes(method_score(method, learner.model, seed), source,
                                       episodes=episodes, dist=dist,
                                       batch_size=cfg.eval.batch_size, quiet=quiet, desc=desc)
        return {**result, "eval_seed": seed}

    seeds = list(seeds) if seeds else [cfg.eval.seed]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"evaluation seeds {seeds} repeat a seed: its episodes would count "
                          "twice; give distinct seeds")
    per_seed = [one_seed(seed) for seed in seeds]
    result = per_seed[0] if len(per_seed) == 1 else combine_seeds(per_seed)
    result.update(part=part, n_way=n_way, k_shot=k_shot, q_query=q_query, method=method,
                  config=cfg.name, seed=cfg.train.seed, world_size=dist.world_size)
    if method == "adapt":
        result["inner_steps"] = (inner_steps if inner_steps is not None
                                 else learner.evaluation_steps)
        if getattr(learner, "test_shift", 0):
            result["test_shift"] = learner.test_shift
    if weights is not None:
        result["weights"] = Path(weights).relative_to(run_dir).as_posix() if Path(
            weights).is_relative_to(run_dir) else str(weights)
        result.update(training_progress(Path(run_dir), Path(weights), cfg))
    dist.on_main(lambda: atomic_write_json(Path(run_dir) / out_name, result), (WriteFailure,))
    return result
