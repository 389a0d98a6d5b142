"""Meta-training: one explicit all-reduce of the meta-gradient per step, periodic validation,
checkpoints, metrics. Distribution is confined to `Distributed`; this loop only asks it for the
rank's share of the tasks and for the mean of a flat buffer.

Per step, with T tasks over W processes: each process takes the contiguous slice T/W of the
step's task indices, computes the mean meta-gradient of its tasks, and one all-reduce forms the
mean over all T tasks (equal shares, so the mean of the means is the global mean). Every process
then clips and steps the same reduced gradient, so all stay identical without broadcasting.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from fsl_dist import checkpoint as ckpt
from fsl_dist import resume as resume_record
from fsl_dist import runfolder
from fsl_dist.backbone import start_from
from fsl_dist.config import Config, ConfigError, OptimConfig, to_dict
from fsl_dist.cpu_malloc import single_arena, tcmalloc_missing, tune_cpu_malloc
from fsl_dist.data.augment import Augment
from fsl_dist.data.episodes import MemoryTasks, StreamTasks, TaskSpec, make_tasks, rank_slice
from fsl_dist.data.shards import verify_shards
from fsl_dist.distributed import launcher_precision
from fsl_dist.evaluate import evaluate
from fsl_dist.io import WriteFailure, writing
from fsl_dist.learners import STAT_KEYS, Learner, check_way, learner_from_config
from fsl_dist.memory_plan import plan_memory
from fsl_dist.meta import InnerLossScaler
from fsl_dist.meta.precision import bf16_cpu_warning
from fsl_dist.models import collect_batch_stats, running_stats_norms, update_running_stats
from fsl_dist.numerics import flat_grads, set_flat_grads
from fsl_dist.progress import below_progress_bar, line_stream, progress
from fsl_dist.runs import ensure_shards, evaluate_held_out, write_run_info
from fsl_dist.signals import (
    STOP_SIGNALS,
    StopRequest,
    at_quit,
    quit_now,
    stop_line,
)
from fsl_dist.slurm import EXIT_RESUMABLE
from fsl_dist.tracking import MetricsFile, wandb_init_kwargs
from fsl_dist.trained import build_run_model, model_inputs, write_trained

DEBUG_CHECKSUM_EVERY = 2


@dataclass
class TrainState:
    model: torch.nn.Module
    learner: Learner  # the family (fsl_dist/learners) around `model`, with its learned state
    optimizer: torch.optim.Optimizer
    outer_scaler: InnerLossScaler  # fp16 only: dynamic scale of the meta-loss
    inner_scaler: InnerLossScaler  # fp16 only: dynamic scale of the support loss
    step: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0  # skipped steps in a row up to now (divergence stops the run)
    elapsed_s: float = 0.0  # training wall time, summed over resumes

    def trainable(self) -> list[torch.Tensor]:
        return self.learner.parameters()


class StepWindow:
    """Training throughput over the steps since the last logged row.

    The logged step is the slow one (it also measures query accuracy before adaptation, about a
    fifth of a Conv-4 MAML step), so its own time would understate the run's speed; the window
    weighs it 1 in `log_every`, as training does. Validation and checkpoints are not counted."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    def add(self, step_time: float) -> None:
        self.seconds += step_time
        self.steps += 1

    def take(self, tasks_per_step: int) -> tuple[float, float]:
        """(tasks per second, mean step time) of the window, which then starts again."""
        rate, mean = tasks_per_step * self.steps / self.seconds, self.seconds / self.steps
        self.seconds, self.steps = 0.0, 0
        return rate, mean


class LossWatch:
    """Warns when the training loss's moving average exceeds ``factor`` times the lower of its
    lowest value so far and the loss of guessing (``chance``, ln N for N-way cross-entropy):
    a climb, or a run that is far worse than chance from the start. Once per excursion, again
    only after the average has come back down. ``advice`` ends the warning: the rates to lower."""

    SMOOTHING = 0.9  # the moving average over about ten steps: one hard batch is no climb
    ADVICE = ("consider a lower algorithm.inner_lr (photos: about 0.01 with 5 inner steps, "
              "MAML's mini-ImageNet value) or optim.lr")

    def __init__(self, factor: Optional[float], chance: float, advice: str = ADVICE):
        self.factor, self.chance, self.advice = factor, chance, advice
        self.average: Optional[float] = None
        self.lowest = math.inf
        self.warned = False

    def update(self, loss: float, step: int) -> Optional[str]:
        if self.factor is None or not math.isfinite(loss):
            return None
        self.average = loss if self.average is None else (
            self.SMOOTHING * self.average + (1 - self.SMOOTHING) * loss)
        self.lowest = min(self.lowest, self.average)
        reference = min(self.lowest, self.chance)
        if self.average <= self.factor * reference:
            self.warned = False
            return None
        if self.warned:
            return None
        self.warned = True
        what = "its lowest so far" if self.lowest < self.chance else "that of guessing"
        return (f"warning: step {step}: the training loss (moving average {self.average:.4g}) is "
                f"over {self.factor:g}x {what} ({reference:.4g}); the run may be diverging: "
                f"{self.advice}")


# ---------------------------------------------------------------- setup


def resolve_precision(configured: Optional[str], launcher: str, device: torch.device) -> str:
    """The config's `precision`, or accelerate's --mixed_precision when the config leaves it
    null."""
    precision = configured or launcher
    if configured and launcher != "no" and launcher != configured:
        raise ConfigError(f"`precision` = {configured!r} in the config but accelerate launch says "
                          f"--mixed_precision {launcher}; set one of them, or make them agree")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("`precision` = 'fp16' needs a CUDA GPU; "
                          "on CPU use precision=bf16 (or no)")
    return precision


def check_process_count(cfg: Config, world_size: int) -> None:
    if cfg.train.meta_batch_size % world_size:
        raise ConfigError(
            f"`train.meta_batch_size` = {cfg.train.meta_batch_size} cannot be divided among "
            f"{world_size} processes; use a multiple of {world_size}")


def configure_cpu(cfg: Config, dist) -> None:
    """Threads per process and the allocator, on CPU only."""
    if dist.device.type == "cpu":
        threads = cfg.train.cpu_threads or max(1, (os.cpu_count() or 1) // dist.local_world_size)
        torch.set_num_threads(threads)
        if cfg.train.tune_cpu_malloc:
            missing = tcmalloc_missing() if cfg.train.cpu_allocator == "tcmalloc" else None
            if missing:
                raise ConfigError(missing)
            outcome = tune_cpu_malloc()
            if outcome not in ("tuned", "tcmalloc"):  # the usual outcomes: a line only otherwise
                dist.print(f"cpu malloc: {outcome}")
            if cfg.train.memory_budget_gb is not None:
                # Before any worker thread allocates: a probe's thread then shares the main
                # arena, whose heap malloc_trim hands back (memory_plan.plan_memory).
                single_arena()


def build_state(cfg: Config, device: torch.device, inputs: dict) -> TrainState:
    """Model, its family's learner (with learned state: step sizes, a scale) and optimizer;
    ``inputs`` (``trained.model_inputs``) are the image channels and side from the shard set's
    manifest."""
    torch.manual_seed(cfg.train.seed)  # the same seed on every rank: identical initial weights
    model = build_run_model(cfg, inputs).to(device)
    try:
        learner = learner_from_config(cfg, model)
    except ValueError as error:  # a model the family cannot use (no `features` body)
        raise ConfigError(f"`algorithm.name` = {cfg.algorithm.name}: {error}") from error
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.optim.lr,
                                 betas=tuple(cfg.optim.betas),
                                 weight_decay=cfg.optim.weight_decay)
    return TrainState(model, learner, optimizer, InnerLossScaler(), InnerLossScaler())


def task_spec(cfg: Config, part: str) -> TaskSpec:
    """The tasks of ``part``: rotation and augmentation for meta-training only (validation and
    test classes are never rotated, their images never augmented); held-out parts take the
    evaluation's way (``eval.n_way``)."""
    train = part == "train"
    n_way = cfg.task.n_way if train else cfg.evaluation_way()
    return TaskSpec(n_way, cfg.task.k_shot, cfg.task.q_query,
                    rotate=cfg.data.rotate and train,
                    augment=Augment.from_config(cfg.data) if train else None)


def build_task_sources(cfg: Config, dist) -> dict:
    """Task samplers for train and val; their constructors check N-way and K+Q against the
    data, so impossible tasks fail here, before any training. Validation always samples from
    memory (its episodes are a pure function of the eval seed)."""
    share = cfg.train.meta_batch_size // dist.world_size
    train = make_tasks(cfg.data.shards, "train", task_spec(cfg, "train"), seed=cfg.train.seed,
                       mode=cfg.data.mode, tasks_per_batch=share, batches=cfg.train.steps,
                       rank=dist.rank, world=dist.world_size,
                       shuffle_buffer=cfg.data.shuffle_buffer,
                       memory_budget_gb=cfg.data.memory_budget_gb)
    val = make_tasks(cfg.data.shards, "val", task_spec(cfg, "val"), seed=cfg.eval.seed,
                     memory_budget_gb=cfg.data.memory_budget_gb)
    return {"train": train, "val": val}


class TrainBatches:
    """This rank's tasks of each step, on the device. Memory mode: task i of step s is a pure
    function of (seed, s, i), so a resumed run meets exactly the tasks it would have met.
    Stream mode: the stream is reseeded from the resumed step (reproducible, but not the
    uninterrupted stream)."""

    def __init__(self, source: MemoryTasks | StreamTasks, my_tasks: range,
                 device: torch.device):
        self.source, self.my_tasks, self.device = source, my_tasks, device

    def at(self, step: int) -> dict:
        tasks = self.source.rank_batch(step, self.my_tasks)
        return {k: v.to(self.device, non_blocking=True) for k, v in tasks.items()}

    def peek(self, step: int) -> dict:
        """``at(step)`` before a start's first step, and that step's ``at(step)`` gives the
        same batch (a probe step's)."""
        tasks = self.at(step)
        self.source.rewind()
        return tasks


# ---------------------------------------------------------------- one step


def outer_lr(optim: OptimConfig, step: int, total_steps: int) -> float:
    """The meta-optimizer's learning rate for the update that follows `step` finished steps."""
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "step":
        return optim.lr * optim.decay_factor ** sum(step >= at for at in optim.decay_at)
    progress = min(step / total_steps, 1.0)  # a run resumed with more steps stays at min_lr
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


def take_step(state: TrainState, params: list[torch.Tensor], grads: torch.Tensor,
              cfg: Config, skip: bool) -> bool:
    """The update every rank takes alike from the all-reduced flat gradient ``grads`` of
    ``params``: clipped, at the schedule's rate, or skipped (``skip``: something was
    non-finite; every rank saw the same sums, so every rank skips). The step counts either way;
    returns whether the optimizer stepped."""
    set_flat_grads(params, grads)
    if skip:
        state.skipped_steps += 1
        state.consecutive_skipped += 1
    else:
        state.consecutive_skipped = 0
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        lr = outer_lr(cfg.optim, state.step, cfg.train.steps)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.optimizer.step()
    state.step += 1
    return not skip


def train_step(state: TrainState, tasks: dict, cfg: Config, dist, precision: str,
               acc_before: bool = True, on_update: Optional[Callable[[], None]] = None) -> dict:
    """Meta-gradient of this rank's tasks, all-reduced to the mean over the meta-batch, then one
    identical Adam step on every rank (skipped on all ranks if anything is non-finite).

    ``acc_before=False`` skips the query forward before adaptation (a fifth of a Conv-4 MAML
    step); its statistic is then NaN. The trainer asks for it on the steps it logs.
    ``on_update`` is called once the meta-gradient is computed, before anything of ``state``
    changes (the trainer's phase flag: a stop before it may save the last finished step).
    How the meta-gradient runs under a memory budget is the learner's (its ``plan``)."""
    params = state.trainable()
    state.optimizer.zero_grad(set_to_none=True)
    fp16 = precision == "fp16"
    outer_scale = state.outer_scaler.scale if fp16 else 1.0
    norms = running_stats_norms(state.model)  # MAML++'s BNRS: per-step running statistics
    with collect_batch_stats() as collector:
        stats = state.learner.meta_backward(
            tasks, step=state.step, precision=precision, acc_before=acc_before,
            loss_scale=outer_scale, inner_loss_scale=state.inner_scaler.scale if fp16 else None)
    if on_update is not None:
        on_update()
    device = params[0].device
    # This rank's mean batch statistics per norm and step; every rank ran as many tasks, so
    # the mean over ranks is the mean over the meta-batch, whatever the number of processes.
    bn_means = collector.means(norms).float().to(device)

    # One collective for the gradient, the batch statistics and the step's statistics together.
    stat_vector = torch.stack([stats[k].float().to(device) for k in STAT_KEYS])
    flat = torch.cat([flat_grads(params).float(), bn_means, stat_vector])
    if flat.is_cuda:  # time the collective alone, not the kernels still queued before it
        torch.cuda.synchronize(flat.device)
    started = time.perf_counter()
    dist.all_reduce_mean_(flat)
    reduced = flat[-len(STAT_KEYS):].tolist()  # waits for the collective
    # Includes waiting for the slowest process to arrive: the cost of synchronising, too.
    allreduce_s = time.perf_counter() - started
    n_grads = flat.numel() - len(STAT_KEYS) - bn_means.numel()
    grads = flat[:n_grads] / outer_scale
    out = dict(zip(STAT_KEYS, reduced))

    inner_bad = out["inner_nonfinite"] > 0
    outer_bad = not bool(torch.isfinite(grads).all())
    if fp16:
        state.inner_scaler.update(inner_bad)
        state.outer_scaler.update(outer_bad)
    grad_norm = torch.linalg.vector_norm(grads).item()
    if take_step(state, params, grads, cfg, skip=inner_bad or outer_bad):
        update_running_stats(norms, flat[n_grads:n_grads + bn_means.numel()])
    out.update(grad_norm=grad_norm, skipped=float(inner_bad or outer_bad), allreduce_s=allreduce_s,
               second_order=stats["second_order"], msl_last_weight=stats["msl_last_weight"])
    return out


# ---------------------------------------------------------------- checkpoints


def checkpoint_state(state: TrainState, wandb_id: Optional[str],
                     config: Optional[dict] = None) -> dict:
    """What a checkpoint holds; ``config`` (to_dict) is what a resume compares its own with."""
    return {
        "step": state.step,
        "skipped_steps": state.skipped_steps,
        "consecutive_skipped": state.consecutive_skipped,
        "elapsed_s": state.elapsed_s,
        "model": state.model.state_dict(),
        # the family's learned state, each under its name ("inner_lr": None when fixed)
        **{name: module.state_dict() if module is not None else None
           for name, module in state.learner.extras().items()},
        "optimizer": state.optimizer.state_dict(),
        "outer_scaler": state.outer_scaler.state_dict(),
        "inner_scaler": state.inner_scaler.state_dict(),
        "rng": ckpt.rng_state(),
        # Memory-mode tasks are a pure function of (seed, step, index): the step is the position.
        "data": {"next_step": state.step},
        "wandb_id": wandb_id,
        "config": config,
    }


def restore_state(state: TrainState, saved: dict) -> None:
    try:
        state.model.load_state_dict(saved["model"])
    except RuntimeError as error:
        detail = [line.strip() for line in str(error).splitlines()][1:2] or [str(error)]
        raise ConfigError(f"the checkpoint's model does not fit the configured one: the model "
                          f"section, algorithm.per_step_bn_weights, per_step_bn_stats and (with "
                          f"them) algorithm.inner_steps must be as trained ({detail[0]})"
                          ) from error
    state.learner.load_extras(saved)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.outer_scaler.load_state_dict(saved["outer_scaler"])
    state.inner_scaler.load_state_dict(saved["inner_scaler"])
    ckpt.set_rng_state(saved["rng"])
    state.step = int(saved["step"])
    state.skipped_steps = int(saved.get("skipped_steps", 0))
    state.consecutive_skipped = int(saved.get("consecutive_skipped", 0))
    state.elapsed_s = float(saved.get("elapsed_s", 0.0))


def load_resume_point(run_dir: Path, resume: Optional[str]):
    """(path, contents, notes) of the checkpoint to resume from: ``resume`` "auto" takes the
    newest that loads (notes say which newer ones were skipped, and why), a path takes that
    file; (None, None, notes) starts afresh."""
    if resume is None:
        return None, None, []
    if resume == "auto":
        path, saved, notes = ckpt.newest_loadable(run_dir)
        if path is None and notes:  # starting afresh would drop the run's metrics
            raise runfolder.RunFolderError(
                f"--resume auto: no checkpoint of {run_dir} loads ({'; '.join(notes)}); start "
                "afresh with --overwrite (the old run is moved aside)")
        return path, saved, notes
    return Path(resume), ckpt.load_checkpoint(Path(resume)), []


# ---------------------------------------------------------------- the loop


def resumable(write):
    """``write()``; a write failure's line also says that the run continues once it is mended."""
    try:
        return write()
    except WriteFailure as err:
        raise type(err)(f"{err} (training continues with --resume auto)") from None


def quiet_wandb_client() -> None:
    """On a Ctrl-C, accelerate's launcher (>= 1.16) stops W&B's service process while the
    trainer stops, and W&B's client thread, writing to the closed socket, logs asyncio's
    warning `socket.send() raised exception.` under the stop line (seen in a terminal). Only
    W&B's client runs asyncio here; its rows are in metrics.jsonl as well."""
    logging.getLogger("asyncio").setLevel(logging.ERROR)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def validate(state: TrainState, cfg: Config, dist, source, precision: str, episodes: int,
             quiet: bool = False) -> dict:
    # below the training bar, cleared when done (leave=False in evaluate)
    return evaluate(state.learner, source, episodes=episodes, dist=dist, precision=precision,
                    batch_size=cfg.eval.batch_size, quiet=quiet, desc="validating")


def validates_at(step: int, cfg: Config) -> bool:
    """Whether training validates after ``step``: every ``train.eval_every`` steps, and after the
    last step too with ``eval.final_val`` (off by default: a short run goes straight to the
    held-out evaluation)."""
    return step % cfg.train.eval_every == 0 or (step == cfg.train.steps and cfg.eval.final_val)


class Trainer:
    """Owns one run: its folder, state, data, trackers; `fit()` trains to `train.steps`.

    Progress (packing, training, validation, the held-out evaluation) shows on the main rank
    unless `quiet`: bars on a terminal, lines in a log (fsl_dist/progress.py); debug mode
    prints a line per step instead."""

    def __init__(self, cfg: Config, dist, run_dir: Path, *, resume: Optional[str] = None,
                 overwrite: bool = False, debug: bool = False, quiet: bool = False,
                 allow_config_change: bool = False):
        self.cfg, self.dist, self.run_dir, self.debug = cfg, dist, Path(run_dir), debug
        self.quiet = quiet or debug or not dist.is_main
        self.lock = self._claim_run_folder(resume, overwrite)
        at_quit(self.release_run_folder)  # a Ctrl-C from now on quits with the folder free
        try:
            self._set_up(resume, allow_config_change)
        except BaseException:
            self.release_run_folder()  # refused before training: the folder is free again
            raise

    def _set_up(self, resume: Optional[str], allow_config_change: bool) -> None:
        """Data, model, optimizer and the resume point (the run folder is locked)."""
        cfg, dist = self.cfg, self.dist
        self.precision = resolve_precision(cfg.precision, launcher_precision(), dist.device)
        warning = bf16_cpu_warning(dist.device.type, self.precision)
        if warning:
            dist.print(warning)
        self.check_setup()
        configure_cpu(cfg, dist)
        self.manifest = ensure_shards(cfg, dist, quiet=self.quiet)
        self.build_training()
        self.wandb_id = None
        resume_from, saved, notes = load_resume_point(self.run_dir, resume)
        for note in notes:
            dist.print(f"resume: {note}")
        changes = []
        if saved is None and cfg.model.init_from is not None:
            # A new run's body from a trained model, the head fresh; a resumed run has its own
            # weights, so the folder it started from may have moved since.
            start_from(self.state.model, cfg.model.init_from)
        if saved is not None:
            changes = self._check_resume(saved, resume_from, allow_config_change)
            self.restore(saved)
            self.wandb_id = saved.get("wandb_id")
            dist.print(f"resumed from {resume_from} at step {self.state.step}")
            for change in changes:
                dist.print(f"resume: from step {self.state.step} on, "
                           f"{resume_record.describe([change], steps=False)} ({change['kind']})")
        self.memory_plan, self.memory_record = None, None
        if cfg.train.memory_budget_gb is not None:  # re-planned at every start
            self.memory_plan, self.memory_record = plan_memory(
                self.state, self.batches.peek(self.state.step), cfg, self.precision, dist)
            self.state.learner.plan = self.memory_plan
        # A validation that a stop cut short is done again first (see _stop_now_if_safe).
        self.validation_pending = saved is not None and saved.get("pending") == "validation"
        self.history = resume_record.history(self.run_dir, self.state.step, changes,
                                             dist.world_size)
        self.metrics = MetricsFile(self.run_dir, enabled=dist.is_main)
        self.loss_watch = LossWatch(cfg.train.loss_warn_factor, math.log(self.classes_guessed()),
                                    self.LOSS_ADVICE)
        self.stop = StopRequest()  # set by a stop signal, acted on between steps
        # What fit() is doing now, for a stop signal's handler (_stop_now_if_safe): starting,
        # tasks (drawing them, the meta-gradient), update, after (logging, checkpoint),
        # validation; finish() sets evaluation.
        self.phase = "starting"
        self._saved_rng = None  # random state of the last finished step (tasks, validation)
        self._failure: Optional[Exception] = None  # an I/O failure on the main rank

    # -------------------------------------------------------- what is trained (a subclass's own)
    # fsl_dist.pretrain.Pretrainer trains another objective in this same loop by overriding
    # these methods; the run folder, resume, signals, checkpoints and logging stay this class's.
    RATE_KEY = "tasks_s"  # the progress bar's throughput: tasks per second
    LOSS_ADVICE = LossWatch.ADVICE  # what a climbing loss's warning suggests

    def check_setup(self) -> None:
        """What is refused before any data is read (the process count, the evaluation's N)."""
        check_process_count(self.cfg, self.dist.world_size)
        check_way(self.cfg)

    def build_training(self) -> None:
        """The data sources, the state (model, optimizer) and this rank's batches."""
        cfg, dist = self.cfg, self.dist
        self.sources = build_task_sources(cfg, dist)  # checksums the train and val parts
        if cfg.eval.part not in ("train", "val"):
            # The held-out part is read only at the end: a damaged shard found after hours of
            # training would cost the run its result, so it is checksummed now as well.
            verify_shards(cfg.data.shards, [cfg.eval.part])
        self.state = build_state(cfg, dist.device, model_inputs(self.manifest))
        for note in self.state.learner.notes(dist.device, precision=self.precision):
            dist.print(note)
        self.batches = TrainBatches(self.sources["train"],
                                    rank_slice(cfg.train.meta_batch_size, dist.rank,
                                               dist.world_size),
                                    dist.device)

    def classes_guessed(self) -> int:
        """The classes of the training loss's softmax (its loss of guessing is the log)."""
        return self.cfg.task.n_way

    def items_per_step(self) -> int:
        return self.cfg.train.meta_batch_size

    def train_step(self, batch, acc_before: bool, on_update: Callable[[], None]) -> dict:
        return train_step(self.state, batch, self.cfg, self.dist, self.precision,
                          acc_before=acc_before, on_update=on_update)

    def step_summary(self, out: dict) -> tuple[float, float]:
        """(loss, accuracy) of a step: shown on the bar; the loss is watched for divergence."""
        return out["query_loss"], out["acc_after"]

    def checkpoint_contents(self) -> dict:
        return checkpoint_state(self.state, self.wandb_id, to_dict(self.cfg))

    def restore(self, saved: dict) -> None:
        restore_state(self.state, saved)

    def _claim_run_folder(self, resume: Optional[str], overwrite: bool):
        """The main process locks the run folder and checks it may start there (the others
        learn the verdict, so every rank fails alike); returns the lock (None elsewhere)."""
        def claim():
            lock, note = runfolder.claim(self.run_dir, resume=resume, overwrite=overwrite)
            self.dist.print(note)
            return lock

        return self.dist.on_main(claim, (runfolder.RunFolderError, WriteFailure))

    def _check_resume(self, saved: dict, resume_from: Path, allow: bool) -> list[dict]:
        """The data and the config a checkpoint resumes with, against those it was trained
        with: another image size is refused naming the shards; a config that changes what is
        trained is refused unless ``allow`` (fsl_dist/resume.py). Returns the changes."""
        folders = [self.run_dir, Path(resume_from).parent.parent]
        resume_record.check_data(folders, self.manifest, self.cfg.data.shards)
        old = resume_record.saved_config(saved, resume_from, self.run_dir)
        if old is None:
            self.dist.print("resume: no saved config to compare with (neither in the checkpoint "
                            "nor in config.yaml); nothing is checked or recorded")
            return []
        return resume_record.check(old, self.cfg, int(saved["step"]), allow=allow,
                                   rate=outer_lr)

    # -------------------------------------------------------- preemption
    def stop_on_signals(self, signals=STOP_SIGNALS) -> None:
        """On any of `signals` (SLURM's warning before the time limit, `kill`, Ctrl-C, a launcher
        passing one of them on or dying), finish the current step, checkpoint and return from
        fit() with `stopped_early` set; a second Ctrl-C quits at once (fsl_dist/signals.py)."""
        self.stop.quit_line = self._quit_line
        quiet_wandb_client()  # from now: the signal may come in the middle of W&B's writes
        self.stop.install(signals)  # and SIGTERM when a launcher dies (PR_SET_PDEATHSIG)
        if self.dist.world_size == 1:
            self.stop.on_first = self._stop_now_if_safe

    def _stop_now_if_safe(self, _frame) -> None:
        """One process. Under a launcher: accelerate's (>= 1.16) passes a signal on and kills
        5 s later, less than a step of the README's ResNet-BOIL on a 2-core CPU (4-8 s
        measured) or a validation of 200 episodes. A signal that comes while a step draws its
        tasks or computes its meta-gradient (most of a step; parameters and optimizer still
        untouched), or during validation (which only reads the weights), saves the last
        finished step at once, with the random state it ended with, prints the stop line and
        exits 75; a validation cut short is marked pending and done first on resume. During
        the held-out evaluation at the end (the last step checkpointed, the model exported) it
        says so and exits 75 (--resume auto evaluates again). During the update, and between
        steps, the step finishes and fit() stops. Without a launcher only that held-out
        evaluation stops at once (nothing else reads the stop flag in it, and it can take
        minutes); a step or a validation finishes first."""
        if self.stop.signum == signal.SIGUSR1 or self.phase not in ("tasks", "validation",
                                                                    "evaluation"):
            return  # SLURM's warning (no launcher kills then), starting, the update, or after
        if self.stop.launcher is None and self.phase != "evaluation":
            return  # no launcher to kill it: the step or validation ends, then fit() stops
        if self.phase == "evaluation":
            line = (f"stopped by a signal during the held-out evaluation of step "
                    f"{self.state.step} of {self.cfg.train.steps}; the model is exported and "
                    f"{ckpt.latest_checkpoint(self.run_dir)} kept, continue with --resume auto "
                    "(it evaluates again)")
        else:
            saved = self.checkpoint_contents()
            saved["rng"] = self._saved_rng
            if self.phase == "validation":
                saved["pending"] = "validation"
            path = ckpt.save_checkpoint(self.run_dir, self.state.step, saved,
                                        keep=self.cfg.train.keep_checkpoints)
            line = stop_line(self.state.step, self.cfg.train.steps, path)
        below_progress_bar()
        print(line, file=line_stream(), flush=True)
        try:
            self.dist.end()  # W&B's files whole (its service may be stopped already)
        except Exception:  # noqa: BLE001 (the checkpoint is written; nothing else to save)
            pass
        quit_now("", EXIT_RESUMABLE)

    def release_run_folder(self) -> None:
        """Give up the run folder's lock: a clean end, so the next start finds it free."""
        if self.lock is not None:
            self.lock.release()

    def _quit_line(self) -> str:
        newest = ckpt.latest_checkpoint(self.run_dir)
        where = (f"--resume auto continues from {newest.name}" if newest is not None
                 else "no checkpoint was written")
        return (f"fsl_dist: interrupted again at step {self.state.step}: quitting without a "
                f"checkpoint of this step; {where}")

    def _should_stop(self) -> bool:
        # A signal may reach only some ranks, an I/O failure only the main one: agree, so all
        # leave the loop after the same step.
        return self.dist.any_true(self.stop.requested or self._failure is not None)

    # -------------------------------------------------------- bookkeeping
    def start(self) -> None:
        self.on_main_write(lambda: self.metrics.truncate_after(self.state.step))
        cfg = self.cfg
        if cfg.logging.wandb or cfg.logging.tensorboard:
            wandb = wandb_init_kwargs(cfg, self.run_dir, self.wandb_id) if cfg.logging.wandb else {}
            failure = None
            try:
                with writing():  # their folders in the run folder (main only)
                    self.dist.start_trackers(cfg.logging.project, to_dict(cfg), wandb,
                                             resumed_at=self.state.step)
            except WriteFailure as err:
                failure = err
            self.raise_on_every_rank(failure)
            self.wandb_id = self.dist.wandb_run_id() or self.wandb_id
        self.on_main_write(lambda: write_run_info(self.cfg, self.run_dir, self.dist,
                                                  self.precision, self.wandb_id, self.manifest,
                                                  history=self.history,
                                                  memory_plan=self.memory_record))

    def on_main_write(self, write) -> None:
        """``write()`` on the main process; a write failure there is raised on every rank, with
        the way to continue once it is mended."""
        self.dist.on_main(lambda: resumable(write), (WriteFailure,))

    def save_checkpoint(self) -> None:
        """Checkpoint now (main process); a failure to write is raised on every rank."""
        state = self.checkpoint_contents()
        self.on_main_write(lambda: ckpt.save_checkpoint(
            self.run_dir, self.state.step, state, keep=self.cfg.train.keep_checkpoints))

    def log(self, row: dict) -> None:
        try:
            resumable(lambda: self.metrics.write(row))
        except WriteFailure as err:  # main only: the loop stops all ranks after this step
            self._failure = self._failure or err
        try:
            self.dist.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        except ConnectionError:
            # accelerate's launcher (>= 1.16) stops W&B's service process with the trainer, and
            # the next row raised ConnectionResetError (measured): the row is in metrics.jsonl.
            if not self.stop.requested:
                raise

    # -------------------------------------------------------- training
    def fit(self) -> dict:
        cfg, state = self.cfg, self.state
        self.start()
        bar = progress(total=cfg.train.steps, initial=state.step, desc=cfg.name, unit="step",
                       quiet=self.quiet, first_line=True)  # in a log: step 1 and its ETA
        self.stopped_early, diverged = False, None
        self._clock = time.perf_counter()
        self._window = StepWindow()
        try:
            if self.validation_pending:  # cut short by the stop this run resumes from
                self.validate_and_log()
                self.save_checkpoint()  # the same step's checkpoint, no longer pending
            while state.step < cfg.train.steps:
                if self._should_stop():
                    self.stopped_early = True
                    break
                self._enter("tasks")
                tasks = self.batches.at(state.step)
                started = time.perf_counter()
                out = self.train_step(tasks,
                                      acc_before=self.debug or self.logs_step(state.step + 1),
                                      on_update=lambda: self._enter("update"))
                self.phase = "after"
                out["step_time"] = time.perf_counter() - started
                self.after_step(out, bar)
                diverged = self.divergence()
                if diverged:
                    break
        finally:
            bar.close()  # a message after it starts on a line of its own
        self.raise_on_every_rank(self._failure)  # a metrics row the main could not write
        if state.step % cfg.train.checkpoint_every or state.step == 0:
            self.save_checkpoint()  # the end of the run (or a stop, even before step 1) resumes
        return {"step": state.step, "skipped_steps": state.skipped_steps,
                "stopped_early": self.stopped_early or diverged is not None,
                "diverged": diverged,
                "checkpoint": ckpt.checkpoint_path(self.run_dir, state.step)}

    def divergence(self) -> Optional[str]:
        """Why the run must stop for non-finite steps, or None (every rank decides alike)."""
        limit, state = self.cfg.train.max_skipped_steps, self.state
        if limit is None or state.consecutive_skipped < limit:
            return None
        return (f"stopped at step {state.step}: the last {state.consecutive_skipped} steps had "
                f"non-finite gradients or losses and were skipped (train.max_skipped_steps = "
                f"{limit}); the weights are those of step {state.step - state.consecutive_skipped}"
                f", checkpointed. Lower optim.lr or algorithm.inner_lr (or use precision=no), "
                "then continue with --resume auto or start afresh")

    def after_step(self, out: dict, bar) -> None:
        cfg, state = self.cfg, self.state
        out["tasks_per_s"] = self.items_per_step() / out["step_time"]
        now = time.perf_counter()
        state.elapsed_s += now - self._clock  # steps, logging, validation, checkpoints
        self._clock = now
        loss, acc = self.step_summary(out)
        postfix = {"loss": f"{loss:.3f}", "acc": f"{acc:.3f}",
                   self.RATE_KEY: f"{out['tasks_per_s']:.1f}"}
        if state.skipped_steps:
            postfix["skipped"] = state.skipped_steps
        bar.set_postfix(postfix, refresh=False)  # shown with the step's count: one draw, or line
        bar.update(1)
        warning = self.loss_watch.update(loss, state.step)
        if warning:
            self.dist.print(warning)
        self._window.add(out["step_time"])
        if self.logs_step(state.step):
            self.log(self.train_row(out, *self._window.take(self.items_per_step())))
        if self.debug:
            self.debug_report(out)
        if validates_at(state.step, cfg):
            self.validate_and_log()
        if state.step % cfg.train.checkpoint_every == 0:
            self.save_checkpoint()

    def _enter(self, phase: str) -> None:
        """Set the phase a stop signal's handler reads; the random state is saved first where a
        stop in that phase checkpoints the last finished step (see _stop_now_if_safe)."""
        stops_in_it = self.stop.on_first is not None and self.stop.launcher is not None
        if phase in ("tasks", "validation") and stops_in_it:
            self._saved_rng = ckpt.rng_state()
        self.phase = phase

    def validate_and_log(self) -> None:
        """Validate the weights of the finished step and log the row."""
        cfg, state = self.cfg, self.state
        self._enter("validation")
        val = validate(state, cfg, self.dist, self.sources["val"], self.precision,
                       cfg.eval.val_episodes, quiet=self.quiet)
        self.phase = "after"
        self.log({"step": state.step, "val/acc": val["mean"], "val/ci95": val["ci95"],
                  "val/acc_before": val["before_adaptation"], "val/episodes": val["episodes"]})

    def logs_step(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps

    def train_row(self, out: dict, tasks_per_s: float, step_time: float) -> dict:
        return {
            "step": self.state.step,
            "train/loss": out["query_loss"], "train/acc_after": out["acc_after"],
            "train/acc_before": out["acc_before"], "train/inner_loss": out["inner_loss"],
            "train/grad_norm": out["grad_norm"], "train/skipped": out["skipped"],
            # MAML++'s schedules at this step: derivative order and the last step's loss weight
            "train/second_order": out["second_order"],
            "train/msl_last_weight": out["msl_last_weight"],
            "lr": self.state.optimizer.param_groups[0]["lr"],
            "perf/tasks_per_s": tasks_per_s, "perf/step_time": step_time,  # since the last row
            "perf/allreduce_time": out["allreduce_s"],
            "perf/peak_memory_mb": peak_memory_mb(self.dist.device),
            "perf/elapsed_s": self.state.elapsed_s,
        }

    def debug_report(self, out: dict) -> None:
        self.dist.print(
            f"step {self.state.step:5d}  loss {out['query_loss']:.4f}  "
            f"inner {out['inner_loss']:.4f}  "
            f"acc {out['acc_before']:.3f}->{out['acc_after']:.3f}  |g| {out['grad_norm']:.4f}  "
            f"{out['step_time'] * 1000:.0f} ms  {out['tasks_per_s']:.1f} tasks/s"
            + ("  SKIPPED (non-finite)" if out["skipped"] else ""))
        if self.state.step % DEBUG_CHECKSUM_EVERY == 0 and self.dist.world_size > 1:
            same, digests = self.dist.parameters_in_sync(self.state.trainable())
            if not same:
                raise RuntimeError("parameters diverged across processes at step "
                                   f"{self.state.step}: {digests}")
            self.dist.print(f"step {self.state.step:5d}  parameters identical on "
                            f"{len(digests)} processes ({digests[0]})")

    # -------------------------------------------------------- the end
    def finish(self, export: bool = True) -> Optional[dict]:
        """Final weights (unless ``export`` is False: a diverged run) and, for a run that
        reached train.steps, the held-out evaluation; returns its results on every rank."""
        cfg = self.cfg
        if export:
            self.on_main_write(self.export)
        result = None
        if self.state.step >= cfg.train.steps:
            self.phase = "evaluation"  # a stop now keeps the checkpoint and the model as they are
            result = evaluate_held_out(self.state.learner, cfg, self.dist,
                                       self.run_dir, precision=self.precision, quiet=self.quiet)
            self.log({"step": self.state.step, f"{cfg.eval.part}/acc": result["mean"],
                      f"{cfg.eval.part}/ci95": result["ci95"]})
        self.raise_on_every_rank(self._failure)
        self.close()
        return result

    def export(self) -> None:
        """model.safetensors and model.yaml (fsl_dist/trained.py) of the weights now."""
        state = self.state
        write_trained(self.run_dir, state.model, self.cfg, self.manifest,
                      extras=state.learner.extras(), step=state.step)

    def raise_on_every_rank(self, failure: Optional[WriteFailure]) -> None:
        """A write failure the main process met (``failure``; None elsewhere) stops every rank
        here."""
        def failed():
            if failure is not None:
                raise failure

        self.dist.on_main(failed, (WriteFailure,))

    def close(self) -> None:
        """End the trackers and give up the run folder (also after a failure every rank saw);
        once."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.dist.barrier()
        try:
            self.dist.end()
        except ConnectionError:
            if not self.stop.requested:  # W&B's service stopped with us (see log)
                raise
        self.release_run_folder()
