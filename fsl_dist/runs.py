"""The run folder and the data a run needs.

    runs/<config name>-<seed>/
        config.yaml          the resolved config (load_config reads it back)
        run.json             world size, device, precision, package versions, git commit, W&B id,
                             the data (data set, channels, image size, shard format version)
        metrics.jsonl        one JSON row per logged step
        checkpoints/         step-NNNNNNNN.pt, the newest few
        wandb/               W&B's own files (offline-run-*/run-<id>.wandb without an API key)
        model.safetensors    final weights (and learned inner step sizes), loadable without pickle
        model.yaml           what is needed to rebuild the model around those weights (its input
                             channels and image size come from the shards' manifest)
        eval.json            the final held-out evaluation
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from safetensors.torch import load_file, save_file

from fsl_dist import checkpoint as ckpt
from fsl_dist import runfolder
from fsl_dist.config import Config, ConfigError, load_config, save_config
from fsl_dist.data.episodes import TaskSpec, make_tasks
from fsl_dist.data.preprocess import preprocessing_of
from fsl_dist.data.shards import (
    ShardError,
    classes_with_at_least,
    load_manifest,
    memory_budget_problem,
    pack_omniglot,
)
from fsl_dist.evaluate import combine_seeds, evaluate
from fsl_dist.io import WriteFailure, atomic_write, atomic_write_json, atomic_write_text
from fsl_dist.meta import InnerLoopSpec, learned_inner_lr
from fsl_dist.models import build_model
from fsl_dist.resume import recorded_changes

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


def model_inputs(manifest: dict) -> dict:
    """What the model takes from the data, always from the shard set's manifest: the image
    channels and side (a hand-kept config value could disagree with the shards)."""
    return {"in_channels": manifest["channels"], "image_size": manifest["image_size"]}


def bn_steps(cfg: Config) -> int:
    """Sets of batch-norm weights the model holds: one per training inner step with
    ``algorithm.per_step_bn_weights`` (MAML++'s BNWB), 0 (one plain set) without."""
    return cfg.algorithm.inner_steps if cfg.algorithm.per_step_bn_weights else 0


def build_run_model(cfg: Config, inputs: dict) -> torch.nn.Module:
    """The configured backbone for images of ``inputs`` (``model_inputs``)."""
    options = dict(width=cfg.model.width, bn_steps=bn_steps(cfg),
                   bn_stats=cfg.algorithm.per_step_bn_stats, **inputs)
    if cfg.model.name == "resnet12":
        options.update(drop_rate=cfg.model.drop_rate, dropblock_size=cfg.model.dropblock_size)
    return build_model(cfg.model.name, cfg.task.n_way, **options)


def check_tasks_fit(cfg: Config, manifest: dict) -> None:
    """N-way and K+Q against every part of the shard set (the test part is used only at the end,
    so it is checked now rather than after hours of training)."""
    needed = cfg.task.k_shot + cfg.task.q_query
    for part, entry in manifest["splits"].items():
        if cfg.task.n_way > entry["classes"]:
            raise ConfigError(f"`task.n_way` = {cfg.task.n_way} is larger than the "
                              f"{entry['classes']} classes of the {part} part of "
                              f"{cfg.data.shards}")
        qualifying = classes_with_at_least(entry["images_per_class"], needed)
        if qualifying < cfg.task.n_way:
            raise ConfigError(f"`task.k_shot` + `task.q_query` = {cfg.task.k_shot} + "
                              f"{cfg.task.q_query} = {needed} images per class: only {qualifying} "
                              f"of the {entry['classes']} classes of the {part} part of "
                              f"{cfg.data.shards} hold that many, fewer than `task.n_way` = "
                              f"{cfg.task.n_way}")


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


def data_facts(manifest: dict) -> dict:
    """What run.json and model.yaml record about the data the model was trained on."""
    return {"dataset": manifest["dataset"], "split": manifest.get("split"),
            "channels": manifest["channels"], "image_size": manifest["image_size"],
            "format_version": manifest["format_version"]}


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
    if memory_plan is not None:
        info["memory_plan"] = memory_plan
    atomic_write_json(run_dir / "run.json", info)


def save_final_model(state, cfg: Config, run_dir: Path, manifest: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.model.state_dict().items()}
    if isinstance(state.inner_lr, torch.nn.Module):
        tensors.update({f"inner_lr.{k}": v.detach().cpu().contiguous()
                        for k, v in state.inner_lr.state_dict().items()})
    atomic_write(run_dir / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    description = {
        "model": {"name": cfg.model.name, "n_way": cfg.task.n_way, "width": cfg.model.width,
                  **model_inputs(manifest), "bn_steps": bn_steps(cfg),
                  "bn_stats": cfg.algorithm.per_step_bn_stats},
        "algorithm": dataclasses.asdict(cfg.algorithm),
        "task": dataclasses.asdict(cfg.task),
        "data": data_facts(manifest),
        # What prediction needs to adapt and score as evaluation does, without the config.
        "evaluation": {"inner_steps": cfg.eval.inner_steps or cfg.algorithm.inner_steps,
                       "precision": cfg.precision},
        "preprocessing": preprocessing_of(manifest),
        # A stopped run exports too: these say how far it got, for whoever evaluates it.
        "step": state.step,
        "planned_steps": cfg.train.steps,
    }
    atomic_write_text(run_dir / "model.yaml", yaml.safe_dump(description, sort_keys=False))


def load_trained(run_dir: Path, device: torch.device, checkpoint: Optional[str] = None):
    """(config, model, inner_lr, weights) of a run folder: its final model.safetensors, or with
    `checkpoint` ("latest", a step number or a path) the weights of a training checkpoint, so a
    run still training, or stopped, can be evaluated at any kept step. `weights` names the file."""
    run_dir = Path(run_dir)
    weights = (run_dir / "model.safetensors" if checkpoint is None
               else find_checkpoint(run_dir, checkpoint))
    for needed in (run_dir / "config.yaml", weights):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: is {run_dir} a finished run folder? "
                                    "(--checkpoint latest evaluates a run that is still training)")
    cfg = load_config(run_dir / "config.yaml")
    if checkpoint is None:
        tensors = load_file(str(weights))
        model_state = {k: v for k, v in tensors.items() if not k.startswith("inner_lr.")}
        inner_lr_state = {k[len("inner_lr."):]: v for k, v in tensors.items()
                          if k.startswith("inner_lr.")}
    else:
        saved = ckpt.load_checkpoint(weights)
        model_state, inner_lr_state = saved["model"], saved.get("inner_lr") or {}
    model = build_run_model(cfg, trained_inputs(run_dir, cfg))
    model.load_state_dict(model_state)
    inner_lr = cfg.algorithm.inner_lr
    if cfg.algorithm.learn_inner_lr:
        algo = cfg.algorithm
        inner_lr = learned_inner_lr(model, algo.name, algo.inner_lr, algo.learn_inner_lr,
                                    algo.inner_steps, adapt=algo.adapt)
        inner_lr.load_state_dict(inner_lr_state)
        inner_lr = inner_lr.to(device)
    return cfg, model.to(device), inner_lr, weights


def training_progress(run_dir: Path, weights: Path, cfg: Config) -> dict:
    """How far the training of ``weights`` got: ``trained_steps`` (None if unknown) of
    ``planned_steps``, whether a trainer holds the run folder now (``training_in_progress``),
    and the config changes run.json records (``config_changes``, only if any). A checkpoint's
    step is in its name; the exported model's in model.yaml."""
    step = None
    name = ckpt.step_of(weights)
    if name is not None:
        step = name
    elif (run_dir / "model.yaml").is_file():
        step = yaml.safe_load((run_dir / "model.yaml").read_text()).get("step")
    return {"trained_steps": step, "planned_steps": cfg.train.steps,
            "training_in_progress": runfolder.holder(run_dir) is not None,
            **({"config_changes": changes} if (changes := recorded_changes(run_dir)) else {})}


def trained_inputs(run_dir: Path, cfg: Config) -> dict:
    """The model inputs of the shards a trained run evaluates on; model.yaml, when the run
    wrote one, must record the same (the shards could have been re-packed at another size)."""
    inputs = model_inputs(load_manifest(cfg.data.shards))
    description = run_dir / "model.yaml"
    if description.is_file():
        recorded = yaml.safe_load(description.read_text()).get("model", {})
        differ = {k: (recorded[k], v) for k, v in inputs.items() if recorded.get(k, v) != v}
        if differ:
            what = ", ".join(f"{k} {was} (trained) vs {now} (shards)"
                             for k, (was, now) in differ.items())
            raise ConfigError(f"{cfg.data.shards} does not match the model of {run_dir}: {what}; "
                              "point data.shards at the shards it was trained on")
    return inputs


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """"latest", a step number, or a file path -> an existing checkpoint file of `run_dir`."""
    kept = ckpt.list_checkpoints(run_dir)
    if which == "latest":
        if not kept:
            raise FileNotFoundError(f"{run_dir} has no checkpoints to evaluate")
        return kept[-1]
    path = ckpt.checkpoint_path(run_dir, int(which)) if which.isdigit() else Path(which)
    if not path.is_file():
        names = ", ".join(p.name for p in kept) or "none"
        raise FileNotFoundError(f"checkpoint {path} does not exist; kept in {run_dir}: {names}")
    return path


# ---------------------------------------------------------------- held-out evaluation


def episode_shape(n_way: int, k_shot: int, q_query: int) -> TaskSpec:
    try:
        return TaskSpec(n_way, k_shot, q_query, rotate=False)
    except ValueError as err:
        raise ConfigError(f"{err} (shots {k_shot}, queries {q_query})") from err


def evaluate_held_out(model, inner_lr, cfg: Config, dist, run_dir: Path, *, precision: str,
                      episodes: Optional[int] = None, shots: Optional[int] = None,
                      queries: Optional[int] = None, part: Optional[str] = None,
                      inner_steps: Optional[int] = None,
                      out_name: str = "eval.json", weights: Optional[Path] = None,
                      seeds: Optional[Sequence[int]] = None, quiet: bool = False) -> dict:
    """Evaluate on `part` (default eval.part) and write `out_name` in the run folder; `weights`,
    the file the model came from, is recorded relative to the run folder; `shots` and `queries`
    replace the trained K and Q per class (comparing runs trained with different Q needs one
    test protocol). With two or more
    `seeds`, `episodes` are drawn for each episode seed and the result is `combine_seeds`'.
    `quiet`: no progress bar."""
    part = part or cfg.eval.part
    episodes = episodes or cfg.eval.episodes
    k_shot = cfg.task.k_shot if shots is None else shots
    q_query = cfg.task.q_query if queries is None else queries
    inner_loop = InnerLoopSpec.from_config(cfg, precision=precision, inner_lr=inner_lr,
                                           evaluation=True, inner_steps=inner_steps)
    tasks = episode_shape(cfg.task.n_way, k_shot, q_query)

    def one_seed(seed: int) -> dict:
        try:
            source = make_tasks(cfg.data.shards, part, tasks, seed=seed,
                                memory_budget_gb=cfg.data.memory_budget_gb)
        except ValueError as err:  # episodes the shards cannot fill: input, not a bug
            raise ConfigError(f"evaluating {k_shot}-shot {q_query}-query episodes: {err}") from err
        desc = f"{part} (seed {seed})" if len(seeds) > 1 else part
        result = evaluate(model, inner_loop, source, episodes=episodes, dist=dist,
                          batch_size=cfg.eval.batch_size, quiet=quiet, desc=desc)
        return {**result, "eval_seed": seed}

    seeds = list(seeds) if seeds else [cfg.eval.seed]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"evaluation seeds {seeds} repeat a seed: its episodes would count "
                          "twice; give distinct seeds")
    per_seed = [one_seed(seed) for seed in seeds]
    result = per_seed[0] if len(per_seed) == 1 else combine_seeds(per_seed)
    result.update(part=part, n_way=cfg.task.n_way, k_shot=k_shot, q_query=q_query,
                  inner_steps=inner_loop.inner_steps, config=cfg.name, seed=cfg.train.seed,
                  world_size=dist.world_size)
    if weights is not None:
        result["weights"] = Path(weights).relative_to(run_dir).as_posix() if Path(
            weights).is_relative_to(run_dir) else str(weights)
        result.update(training_progress(Path(run_dir), Path(weights), cfg))
    dist.on_main(lambda: atomic_write_json(Path(run_dir) / out_name, result), (WriteFailure,))
    return result
