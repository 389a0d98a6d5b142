"""Supervised pre-training: the body ``features`` and a linear head over every class of the
train part, trained by cross-entropy on batches of images, validated by few-shot episodes of
the val part (nearest centroid on the body's features), so that the best step can be chosen.

    accelerate launch launch/pretrain.py --config configs/pretrain/omniglot_cnn.yaml
    fsl-pretrain --config pretrain/omniglot_cnn train.steps=2000            # installed
    fsl-train --config cnn_maml model.init_from=runs/omniglot_cnn-0         # then meta-train

It runs in the meta-trainer's loop (``Pretrainer`` is a ``Trainer``): the same run folder and
its lock, checkpoints and exact resume, stop signals, metrics.jsonl, W&B and TensorBoard, the
progress bar; ``train.*`` and ``optim.*`` mean what they mean there (steps, seed, cadences, lr
and its schedule), ``pretrain.*`` adds the batch and the optimiser.

The data of step ``s`` is a pure function of (train.seed, s): each epoch is one permutation of
every (image, rotation) of the train part, drawn from (seed, epoch), and step s takes the next
``pretrain.batch_size`` of it (an epoch's incomplete last batch is left out). With
``data.rotate`` (Omniglot) each quarter turn of a class is a class of its own, as Chen et al.
(2019) pre-train on Omniglot: the head has 4 x classes outputs. Each process takes a contiguous
share of the batch, in whole groups of ``pretrain.norm_group`` images; each group is its own
forward (batch norm normalises with the group's statistics) and seeds the random numbers of its
forward (DropBlock) by (seed, step, group). So the mean gradient, formed by one all-reduce, and
the step every process then takes alike are those of one process, for any number of processes
and after any resume.

Augmentation (``data.augment``, fsl_dist/data/augment.py): ``ImageBatches.augment`` is called
with this rank's float images [n, C, H, W] in [0, 1], the step and the images' positions in the
epoch's order (``items``); each image's random numbers come from (seed, step, item) alone
(``augment_by_position``), which keeps runs exact across process counts and resumes.

The exported model (model.safetensors and model.yaml, read back by evaluation, prediction and
``model.init_from``) holds the weights of the best validation (the highest nearest-centroid
accuracy on ``eval.val_episodes`` val episodes, the earliest of equals; the last step when the
run never validated), as Chen et al. (2019), FEAT and MetaOptNet keep their best validated
pre-training; pretrain.json names the exported step, its accuracy and the last step. The last
step's weights stay in the newest checkpoint. At the end the exported backbone is evaluated on
``eval.part`` by nearest centroid (eval.json). model.yaml describes the model as what it is for
few-shot use, nearest centroid, which is ProtoNet's scoring at scale 1
(fsl_dist.trained.as_pretrained): fsl-evaluate and fsl-predict use it so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fsl_dist.config import Config, ConfigError
from fsl_dist.data.augment import Augment
from fsl_dist.data.episodes import make_tasks, to_unit_float
from fsl_dist.data.shards import ClassPool, load_class_pool, verify_shards
from fsl_dist.evaluate import evaluate_episodes
from fsl_dist.finetune import FrozenBody, centroid_accuracy
from fsl_dist.io import atomic_write_json
from fsl_dist.meta import InnerLossScaler
from fsl_dist.meta.precision import autocast_factory
from fsl_dist.numerics import flat_grads
from fsl_dist.runs import evaluate_held_out
from fsl_dist.trained import build_described, model_facts, model_inputs, write_trained
from fsl_dist.trainer import Trainer, TrainState, peak_memory_mb, take_step, task_spec

STAT_KEYS = ("loss", "acc")
SUMMARY = "pretrain.json"  # in the run folder: which step was exported, and why


# ---------------------------------------------------------------- data


class ImageBatches:
    """The train part as labelled images; the batch of step s is a pure function of
    (seed, s). ``rows`` of ``batch`` are this rank's positions in the step's batch."""

    def __init__(self, pool: ClassPool, batch_size: int, seed: int, rotate: bool,
                 augment: Optional[Callable] = None):
        self.pool, self.batch_size, self.seed, self.augment = pool, batch_size, seed, augment
        self.rotations = 4 if rotate else 1
        self.labels = torch.from_numpy(np.repeat(np.arange(pool.num_classes), pool.counts))
        self.items = len(pool.images) * self.rotations
        self.steps_per_epoch = self.items // batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"`pretrain.batch_size` = {batch_size} is larger than the "
                              f"{self.items} images of the train part of {pool.shard_dir}")
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))

    @property
    def classes(self) -> int:
        """Outputs of the head: each class, each of its rotations a class of its own."""
        return self.pool.num_classes * self.rotations

    def step_items(self, step: int) -> np.ndarray:
        """The positions (image + images * quarter turns) of step ``step``'s whole batch."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(
                self.items))
        return self._order[1][position * self.batch_size:(position + 1) * self.batch_size]

    def batch(self, step: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float [n, C, H, W], labels int64 [n]) of ``rows`` of step ``step``."""
        items = torch.from_numpy(self.step_items(step)[rows.start:rows.stop])
        images, turns = items % len(self.pool.images), items // len(self.pool.images)
        x = self.pool.images[images]
        for k in range(1, self.rotations):
            turned = turns == k
            x[turned] = torch.rot90(x[turned], k, dims=(-2, -1))
        x = to_unit_float(x)
        if self.augment is not None:
            x = self.augment(x, step, items)
        return x, self.labels[images] + turns * self.pool.num_classes


def augment_by_position(augment: Optional[Augment], seed: int) -> Optional[Callable]:
    """``ImageBatches``' hook for ``augment`` (None: no augmentation): each image augmented by
    the key (seed, step, its position in the epoch's order), whichever process holds it."""
    if augment is None:
        return None
    return lambda x, step, items: augment.each(x, [(seed, step, int(i)) for i in items])


class RankImages:
    """This rank's rows of each step's batch, on its device (the loop's ``batches``)."""

    def __init__(self, images: ImageBatches, rows: range, device: torch.device):
        self.images, self.rows, self.device = images, rows, device

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.images.batch(step, self.rows)
        return x.to(self.device, non_blocking=True), y.to(self.device)


def share_of(batch_size: int, group: int, rank: int, world: int) -> range:
    """This rank's contiguous rows of a step's batch, in whole groups of ``group``."""
    groups = batch_size // group
    if groups % world:
        raise ConfigError(f"`pretrain.batch_size` = {batch_size} in groups of "
                          f"`pretrain.norm_group` = {group} gives {groups} groups, which "
                          f"{world} processes cannot share equally; set pretrain.norm_group to "
                          f"a divisor of {batch_size // world} (a process's share)")
    per_rank = groups // world * group
    return range(rank * per_rank, (rank + 1) * per_rank)


def group_seed(seed: int, step: int, group: int) -> int:
    """The torch seed of one group's forward (DropBlock's masks), by (seed, step, group)."""
    return int(np.random.default_rng((seed, step, group)).integers(2**62))


# ---------------------------------------------------------------- one step


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    if cfg.pretrain.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.pretrain.momentum,
                               nesterov=cfg.pretrain.nesterov,
                               weight_decay=cfg.optim.weight_decay)
    return torch.optim.Adam(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)


def pretrain_step(state: TrainState, batch, rows: range, cfg: Config, dist, precision: str,
                  on_update: Optional[Callable[[], None]] = None) -> dict:
    """The mean cross-entropy gradient of the step's batch (this rank's ``rows`` of it, one
    all-reduce), then one identical step on every rank (skipped on all if non-finite)."""
    x, y = batch
    params = list(state.model.parameters())
    state.optimizer.zero_grad(set_to_none=True)
    group = cfg.pretrain.norm_group or cfg.pretrain.batch_size
    groups = len(x) // group
    autocast = autocast_factory(precision, x.device.type)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    state.model.train()
    for g in range(groups):
        torch.manual_seed(group_seed(cfg.train.seed, state.step, rows.start // group + g))
        picked = slice(g * group, (g + 1) * group)
        with autocast():
            logits = state.model(x[picked])
        loss = F.cross_entropy(logits.float(), y[picked])
        (loss / groups).backward()
        loss_sum += loss.detach()
        correct += (logits.argmax(-1) == y[picked]).sum()
    if on_update is not None:
        on_update()
    stats = torch.stack([loss_sum / groups, correct / len(x)])
    flat = torch.cat([flat_grads(params).float(), stats.float()])
    started = time.perf_counter()
    dist.all_reduce_mean_(flat)
    out = dict(zip(STAT_KEYS, flat[-len(STAT_KEYS):].tolist()))
    allreduce_s = time.perf_counter() - started
    grads = flat[:-len(STAT_KEYS)]
    bad = not bool(torch.isfinite(grads).all())
    grad_norm = torch.linalg.vector_norm(grads).item()
    take_step(state, params, grads, cfg, skip=bad)  # the meta-trainer's update, alike
    out.update(grad_norm=grad_norm, skipped=float(bad), allreduce_s=allreduce_s)
    return out


# ---------------------------------------------------------------- the run


def check_pretrainable(cfg: Config) -> None:
    if cfg.algorithm.per_step_bn_weights:
        raise ConfigError("pre-training trains one set of batch-norm weights: set "
                          "algorithm.per_step_bn_weights=false (a MAML++ run started from it "
                          "with model.init_from takes them as they are)")
    if cfg.data.mode != "memory":
        raise ConfigError("pre-training holds the train part in memory (within "
                          "data.memory_budget_gb); set data.mode=memory")
    if cfg.precision == "fp16":
        raise ConfigError("pre-training runs in precision no or bf16 (fp16 would need a loss "
                          "scaler); set precision=bf16")


class Pretrainer(Trainer):
    """Supervised pre-training in the meta-trainer's loop (see the module's docstring)."""

    RATE_KEY = "img_s"
    LOSS_ADVICE = "consider a lower optim.lr"

    def check_setup(self) -> None:
        check_pretrainable(self.cfg)
        group = self.cfg.pretrain.norm_group or self.cfg.pretrain.batch_size
        try:
            self.rows = share_of(self.cfg.pretrain.batch_size, group, self.dist.rank,
                                 self.dist.world_size)
        except ConfigError as err:
            err.raised_on_main = True  # every rank refuses alike: the main one says it
            raise

    def build_training(self) -> None:
        cfg, dist = self.cfg, self.dist
        verify_shards(cfg.data.shards, ["train", "val"] + (
            [cfg.eval.part] if cfg.eval.part not in ("train", "val") else []))
        self.images = ImageBatches(load_class_pool(cfg.data.shards, "train", verify=False),
                                   cfg.pretrain.batch_size, cfg.train.seed, cfg.data.rotate,
                                   augment_by_position(Augment.from_config(cfg.data),
                                                       cfg.train.seed))
        self.sources = {"val": make_tasks(cfg.data.shards, "val", task_spec(cfg, "val"),
                                          seed=cfg.eval.seed, verify=False,
                                          memory_budget_gb=cfg.data.memory_budget_gb)}
        # the model with a head over the train classes (validation keeps task.n_way's tasks)
        self.facts = model_facts(cfg, model_inputs(self.manifest), n_way=self.images.classes)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_described(self.facts)
        for needed in ("features", "classifier"):
            if not hasattr(model, needed):
                raise ConfigError(f"pre-training trains a model's `features` body with a new "
                                  f"`classifier`: model {cfg.model.name} has no `{needed}`")
        model = model.to(dist.device)  # model.init_from: Trainer._set_up, for a new run
        self.state = TrainState(model, FrozenBody(model),
                                build_optimizer(cfg, model.parameters()),
                                InnerLossScaler(), InnerLossScaler())
        self.best: dict = {"step": None, "acc": None, "model": None}
        self.batches = RankImages(self.images, self.rows, dist.device)
        dist.print(f"pre-training on {self.images.items} images of {self.images.classes} "
                   f"classes: {self.images.steps_per_epoch} steps per epoch of "
                   f"{cfg.pretrain.batch_size} images")

    def classes_guessed(self) -> int:
        return self.images.classes

    def items_per_step(self) -> int:
        return self.cfg.pretrain.batch_size

    def train_step(self, batch, acc_before: bool, on_update) -> dict:
        return pretrain_step(self.state, batch, self.rows, self.cfg, self.dist, self.precision,
                             on_update=on_update)

    def step_summary(self, out: dict) -> tuple[float, float]:
        return out["loss"], out["acc"]

    def train_row(self, out: dict, images_per_s: float, step_time: float) -> dict:
        return {"step": self.state.step, "train/loss": out["loss"], "train/acc": out["acc"],
                "train/grad_norm": out["grad_norm"], "train/skipped": out["skipped"],
                "train/epoch": self.state.step / self.images.steps_per_epoch,
                "lr": self.state.optimizer.param_groups[0]["lr"],
                "perf/images_per_s": images_per_s, "perf/step_time": step_time,
                "perf/allreduce_time": out["allreduce_s"],
                "perf/peak_memory_mb": peak_memory_mb(self.dist.device),
                "perf/elapsed_s": self.state.elapsed_s}

    def debug_report(self, out: dict) -> None:
        self.dist.print(f"step {self.state.step:5d}  loss {out['loss']:.4f}  acc "
                        f"{out['acc']:.3f}  |g| {out['grad_norm']:.4f}  "
                        f"{out['step_time'] * 1000:.0f} ms")

    # -------------------------------------------------------- the best validated step
    def checkpoint_contents(self) -> dict:
        return {**super().checkpoint_contents(), "best": self.best}

    def restore(self, saved: dict) -> None:
        super().restore(saved)
        self.best = saved.get("best") or self.best

    def validate_and_log(self) -> None:
        """Nearest-centroid accuracy of the body on val episodes; the best is kept."""
        cfg, state = self.cfg, self.state
        self._enter("validation")
        val = evaluate_episodes(lambda tasks, _: {"acc": centroid_accuracy(state.model, tasks)},
                                self.sources["val"], episodes=cfg.eval.val_episodes,
                                dist=self.dist, batch_size=cfg.eval.batch_size,
                                quiet=self.quiet, desc="validating")
        if self.best["acc"] is None or val["mean"] > self.best["acc"]:
            weights = {k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}
            self.best = {"step": state.step, "acc": val["mean"], "model": weights}
        self.phase = "after"
        self.log({"step": state.step, "val/acc": val["mean"], "val/ci95": val["ci95"],
                  "val/episodes": val["episodes"], "val/best_acc": self.best["acc"],
                  "val/best_step": self.best["step"]})

    # -------------------------------------------------------- the end
    def exported(self) -> dict:
        """What is exported: the best validated weights, else the last."""
        if self.best["model"] is None:
            return {"exported": "last", "step": self.state.step, "val_acc": None}
        return {"exported": "best", "step": self.best["step"], "val_acc": self.best["acc"]}

    def finish(self, export: bool = True) -> Optional[dict]:
        cfg, state = self.cfg, self.state
        chosen = self.exported()
        model = state.model
        if chosen["exported"] == "best":
            model = build_described(self.facts)
            model.load_state_dict(self.best["model"])
            model = model.to(self.dist.device)
        if export:
            self.on_main_write(lambda: self._export(model, chosen))
        result = None
        if state.step >= cfg.train.steps:
            self.phase = "evaluation"  # a stop now keeps the checkpoint and the model as they are
            result = evaluate_held_out(FrozenBody(model), cfg, self.dist, self.run_dir,
                                       precision=self.precision, quiet=self.quiet,
                                       method="centroid")
            self.log({"step": state.step, f"{cfg.eval.part}/acc": result["mean"],
                      f"{cfg.eval.part}/ci95": result["ci95"]})
        self.raise_on_every_rank(self._failure)
        self.close()
        return result

    def _export(self, model, chosen: dict) -> None:
        # model.yaml's step says how far training got (evaluation reports a run stopped early by
        # it); which step's weights these are, pretrain.json says
        # described as a nearest-centroid (ProtoNet, scale 1) model, the head's classes noted
        write_trained(self.run_dir, model, self.cfg, self.manifest, step=self.state.step,
                      pretrained=self.images.classes)
        atomic_write_json(Path(self.run_dir) / SUMMARY,
                          {**chosen, "last_step": self.state.step,
                           "planned_steps": self.cfg.train.steps,
                           "classes": self.images.classes,
                           "steps_per_epoch": self.images.steps_per_epoch})
