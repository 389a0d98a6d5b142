"""What a resumed run may change, and run.json's record of what it changed.

Every config key has one kind (``KINDS``; a test checks that every field of Config has one):

- ``TRAINED``: the key defines what is trained (algorithm and its options, task shape, model,
  data, seed, optimiser, precision, meta-batch). Resuming with it changed mixes two runs, so it
  is refused unless the trainer is given ``--allow-config-change``.
- ``SCHEDULE``: the outer learning rate's schedule (``optim.schedule``, ``min_lr``,
  ``decay_at``, ``decay_factor``). The rate is a function of the step, so a change that keeps the
  rate of every finished step (a decay at or after the resume step) makes the run exactly the
  new schedule's run from the start: it passes. One that rewrites the past is as ``TRAINED``.
- ``BOOKKEEPING``: the key does not change the weights (logging, checkpoint and evaluation
  cadence, the number of steps, evaluation episodes, threads, the guards): it passes.

Every change of any kind is recorded in run.json (``config_changes``: key, old, new, kind and
the step from which it applies), and ``evaluate`` and ``compare`` show it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

import yaml

from fsl_dist.config import Config, ConfigError, OptimConfig, to_dict

TRAINED, SCHEDULE, BOOKKEEPING = "trained", "schedule", "bookkeeping"

KINDS = {
    "name": BOOKKEEPING,  # names the folder and the W&B group only
    "precision": TRAINED,
    "data.shards": TRAINED,  # another path may hold other data (moved shards: the flag)
    "data.dataset": TRAINED, "data.split": TRAINED, "data.mode": TRAINED,
    "data.rotate": TRAINED, "data.image_size": TRAINED, "data.shuffle_buffer": TRAINED,
    "data.augment": TRAINED, "data.augment_padding": TRAINED, "data.augment_scale": TRAINED,
    "data.augment_jitter": TRAINED, "data.augment_flip": TRAINED,
    "data.source": BOOKKEEPING,  # read only to pack missing shards
    "data.memory_budget_gb": BOOKKEEPING,
    "task.n_way": TRAINED, "task.k_shot": TRAINED, "task.q_query": TRAINED,
    "model.name": TRAINED, "model.width": TRAINED, "model.drop_rate": TRAINED,
    "model.dropblock_size": TRAINED,
    "model.init_from": TRAINED,  # the initial weights: another folder starts another run
    "pretrain.batch_size": TRAINED, "pretrain.norm_group": TRAINED,
    "pretrain.optimizer": TRAINED, "pretrain.momentum": TRAINED, "pretrain.nesterov": TRAINED,
    "algorithm.name": TRAINED, "algorithm.inner_steps": TRAINED, "algorithm.inner_lr": TRAINED,
    "algorithm.first_order": TRAINED, "algorithm.first_order_steps": TRAINED,
    "algorithm.learn_inner_lr": TRAINED, "algorithm.inner_loss": TRAINED,
    "algorithm.msl_steps": TRAINED, "algorithm.per_step_bn_weights": TRAINED,
    "algorithm.per_step_bn_stats": TRAINED, "algorithm.adapt": TRAINED,
    "algorithm.vectorize": BOOKKEEPING,  # the same tasks and sums, by vmap or by a loop
    "algorithm.checkpoint": BOOKKEEPING,  # the same meta-gradient, less memory (float order)
    "algorithm.meta_gradient": TRAINED, "algorithm.proximal_lambda": TRAINED,
    "algorithm.cg_steps": TRAINED, "algorithm.cg_damping": TRAINED,
    "algorithm.proto_head": TRAINED,
    "optim.lr": TRAINED, "optim.weight_decay": TRAINED, "optim.grad_clip": TRAINED,
    "optim.betas": TRAINED,
    "optim.schedule": SCHEDULE, "optim.min_lr": SCHEDULE, "optim.decay_at": SCHEDULE,
    "optim.decay_factor": SCHEDULE,
    "train.steps": BOOKKEEPING,  # extending a run is the README's documented resume
    "train.meta_batch_size": TRAINED, "train.seed": TRAINED,
    "train.checkpoint_every": BOOKKEEPING, "train.keep_checkpoints": BOOKKEEPING,
    "train.eval_every": BOOKKEEPING, "train.log_every": BOOKKEEPING,
    "train.memory_budget_gb": BOOKKEEPING,  # re-planned at every start; same meta-gradient
    "train.cpu_threads": BOOKKEEPING, "train.tune_cpu_malloc": BOOKKEEPING,
    "train.cpu_allocator": BOOKKEEPING,
    "train.max_skipped_steps": BOOKKEEPING, "train.loss_warn_factor": BOOKKEEPING,
    # evaluation reads the weights, never changes them
    "eval.episodes": BOOKKEEPING, "eval.val_episodes": BOOKKEEPING,
    "eval.inner_steps": BOOKKEEPING, "eval.part": BOOKKEEPING, "eval.batch_size": BOOKKEEPING,
    "eval.seed": BOOKKEEPING, "eval.final_val": BOOKKEEPING, "eval.n_way": BOOKKEEPING,
    "eval.test_shift": BOOKKEEPING,
    "protonet.scale": TRAINED, "protonet.learn_scale": TRAINED,
    "ridge.lam": TRAINED, "ridge.learn_lambda": TRAINED, "ridge.scale": TRAINED,
    "ridge.learn_scale": TRAINED,
    "logging.wandb": BOOKKEEPING, "logging.tensorboard": BOOKKEEPING,
    "logging.project": BOOKKEEPING, "logging.entity": BOOKKEEPING, "logging.group": BOOKKEEPING,
    "logging.tags": BOOKKEEPING,
}
ALLOW_FLAG = "--allow-config-change"


def config_fields(cls=Config, prefix: str = "") -> list[str]:
    """Every leaf key of the config, dotted (``algorithm.inner_lr`` is one key, per group or
    not)."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys += config_fields(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def flatten(raw: dict) -> dict:
    """A config's dict (config.yaml, to_dict) by dotted key, restricted to the known keys; a key
    it lacks (written by an older fsl_dist) has its default, the behaviour it had then."""
    defaults = to_dict(Config())
    out = {}
    for key in KINDS:
        node, default = raw, defaults
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
            default = default[part]
        out[key] = default if node is _ABSENT else node
    return out


_ABSENT = object()


def changes(old: dict, new: Config, step: int) -> list[dict]:
    """The keys whose values differ between the saved config ``old`` (a dict) and ``new``, each
    as {key, old, new, kind, step}."""
    before, after = flatten(old), flatten(to_dict(new))
    return [{"key": key, "old": before[key], "new": after[key], "kind": KINDS[key],
             "step": step} for key in KINDS if _canonical(before[key]) != _canonical(after[key])]


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def rates_kept(old: dict, new: Config, step: int,
               rate: Callable[[OptimConfig, int, int], float]) -> bool:
    """Whether every one of the ``step`` finished steps keeps its outer learning rate under the
    new schedule (``rate``: trainer.outer_lr)."""
    try:
        before = OptimConfig(**old["optim"])
        old_steps = int(old["train"]["steps"])
    except (KeyError, TypeError, ValueError):
        return False
    return all(rate(before, s, old_steps) == rate(new.optim, s, new.train.steps)
               for s in range(step))


def check(old: dict, new: Config, step: int, *, allow: bool,
          rate: Callable[[OptimConfig, int, int], float]) -> list[dict]:
    """The changes of a resume at ``step``; a ConfigError naming the keys that would change what
    is trained (old -> new) unless ``allow``."""
    found = changes(old, new, step)
    schedule_ok = rates_kept(old, new, step, rate)
    for change in found:
        if change["kind"] == SCHEDULE and schedule_ok:
            change["kind"] = f"{SCHEDULE} (the finished steps keep their rates)"
    blocked = [c for c in found if c["kind"] in (TRAINED, SCHEDULE)]
    if blocked and not allow:
        listed = "; ".join(f"{c['key']} {_shown(c['old'])} -> {_shown(c['new'])}"
                           for c in blocked)
        raise ConfigError(f"resuming at step {step} with a config that changes what the run "
                          f"trains ({listed}): resume with the saved values (config.yaml of the "
                          f"run), or pass {ALLOW_FLAG} to continue with them (run.json records "
                          "the change)")
    return found


def _shown(value) -> str:
    return json.dumps(value)


def saved_config(saved: dict, checkpoint: Optional[Path], run_dir: Path) -> Optional[dict]:
    """The config the checkpoint was trained with: stored in it (since this version), else the
    config.yaml of its run folder; None when neither is there."""
    if isinstance(saved.get("config"), dict):
        return saved["config"]
    folders = [Path(checkpoint).parent.parent] if checkpoint is not None else []
    for folder in folders + [Path(run_dir)]:
        path = folder / "config.yaml"
        if path.is_file():
            loaded = yaml.safe_load(path.read_text())
            return loaded if isinstance(loaded, dict) else None
    return None


def history(run_dir: Path, step: int, found: list[dict], world_size: int) -> dict:
    """run.json's record of the run's segments and config changes, for a (re)start at ``step``:
    what the old run.json held up to ``step`` (later entries belong to steps now dropped), and
    this start's own entries."""
    old = {}
    path = Path(run_dir) / "run.json"
    if step and path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
    segments = [s for s in old.get("segments", []) if s.get("step", 0) < step]
    kept = [c for c in old.get("config_changes", []) if c.get("step", 0) <= step]
    segments.append({"step": step, "world_size": world_size})
    return {"segments": segments, "config_changes": kept + found}


def describe(config_changes: list[dict], steps: bool = True) -> str:
    """One line's worth: ``algorithm.name "maml" -> "boil" at step 2; ...``."""
    return "; ".join(f"{c['key']} {_shown(c['old'])} -> {_shown(c['new'])}"
                     + (f" at step {c['step']}" if steps else "") for c in config_changes)


def recorded_changes(run_dir: Path) -> list[dict]:
    """The config changes run.json records (empty for a run never resumed with a change)."""
    path = Path(run_dir) / "run.json"
    try:
        return list(json.loads(path.read_text()).get("config_changes", []))
    except (OSError, ValueError, AttributeError):
        return []


def check_data(folders: list[Path], manifest: dict, shards: str) -> None:
    """The shards a run resumes on must hold images of the size and channels it was trained on
    (the data of run.json in the first of ``folders`` that has one), or the model cannot take
    them."""
    trained = {}
    for folder in folders:
        try:
            trained = json.loads((Path(folder) / "run.json").read_text()).get("data") or {}
            break
        except (OSError, ValueError, AttributeError):
            continue
    differ = [(k, trained[k], manifest[k]) for k in ("image_size", "channels")
              if k in trained and trained[k] != manifest.get(k)]
    if differ:
        what = ", ".join(f"{k} {was} (trained) vs {now} (shards)" for k, was, now in differ)
        raise ConfigError(f"the shards at {shards} do not hold the images this run was trained "
                          f"on: {what}; point data.shards at the shards it was trained on "
                          f"(run.json records them)")
