"""Everything distributed lives here: the only module that imports accelerate or torch.distributed.

The rest of fsl_dist sees a `Distributed` object: rank, world size, device, and a handful of
collectives written so that one process is the trivial case of many (every collective is a
no-op when the world size is 1). Launch with accelerate's usual flags:

    accelerate launch launch/train.py --config configs/resnet_boil.yaml                 # 1 process
    accelerate launch --multi_gpu --num_processes 8 launch/train.py --config ...        # 8 GPUs
    accelerate launch --multi_gpu --num_processes 2 launch/train.py --config ...
        # 2 CPU ranks (gloo) without CUDA
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Optional

import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker, on_main_process
from accelerate.utils import InitProcessGroupKwargs

from fsl_dist.progress import line_stream
from fsl_dist.signals import leave

# A rank that dies leaves the others blocked in a collective; accelerate's launcher (torchrun)
# then ends the job, and this timeout is the backstop when no launcher watches.
COLLECTIVE_TIMEOUT = datetime.timedelta(
    seconds=int(os.environ.get("FSL_COLLECTIVE_TIMEOUT_S", "600")))


def launcher_precision() -> str:
    """The precision asked for through `accelerate launch --mixed_precision` (or its config)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


TENSORBOARD_DIR = "tensorboard"  # in the run folder: `tensorboard --logdir <run-dir>/tensorboard`


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """The config as TensorBoard hyperparameters, which are bool, int, float, str or None only
    (add_hparams raises on a nested dict): sections become dotted keys ("optim.lr"), lists their
    text ("[0.9, 0.999]")."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class RunTensorBoard(TensorBoardTracker):
    """accelerate's TensorBoard tracker writing to <run-dir>/tensorboard/ (its default would be
    <project_dir>/<W&B project name>/), with the config as hyperparameters of that same run."""

    def __init__(self, run_dir: str):
        super().__init__(run_name=TENSORBOARD_DIR, logging_dir=run_dir)

    def resume_after(self, step: int) -> None:
        """Before start(): a run resumed at `step` hides what earlier sessions logged after it
        (SummaryWriter's purge_step), as metrics.jsonl drops those rows; otherwise a resume
        from an older checkpoint would leave two values at the steps it repeats."""
        if step > 0:
            self.init_kwargs["purge_step"] = step + 1  # the SummaryWriter's keyword arguments

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        # Flat, into the scalars' own run. accelerate's version gives the nested config to
        # add_hparams, which raises ValueError on a dict value, and would open a new timestamped
        # sub-run (plus an hparams.yml copy of config.yaml) at every start and resume.
        from torch.utils.tensorboard.summary import hparams  # needs tensorboard: import late

        for summary in hparams(flat_hparams(values), metric_dict={}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()


def cuda_available() -> bool:
    # ACCELERATE_USE_CPU=1 forces the CPU even where CUDA exists.
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not forced_cpu


class Distributed:
    """Rank, device and collectives of this process, over accelerate's process group."""

    def __init__(self, *, log_with_wandb: bool = False, log_with_tensorboard: bool = False,
                 project_dir: Optional[str] = None):
        trackers = ["wandb"] if log_with_wandb else []
        self._wandb, self._tensorboard = log_with_wandb, None
        if log_with_tensorboard:
            if project_dir is None:
                raise ValueError("TensorBoard writes into the run folder: give project_dir")
            self._tensorboard = RunTensorBoard(project_dir)
            trackers.append(self._tensorboard)
        # Without CUDA, `--multi_gpu` would start processes that each believe they are rank 0
        # of 1 unless accelerate is told to use the CPU: then it forms a gloo group instead.
        self.accelerator = Accelerator(
            cpu=not cuda_available(),
            mixed_precision="no",  # fsl_dist applies its own autocast inside the inner loop
            log_with=trackers or None,
            project_dir=project_dir,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
        )
        self._trackers_started = False

    # ------------------------------------------------------------ who and where
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def local_world_size(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def backend(self) -> str:
        return torch_dist.get_backend() if torch_dist.is_initialized() else "none"

    def print(self, *args, file=None, **kwargs) -> None:
        """print() on the main process, below any progress bar (progress.line_stream)."""
        self.accelerator.print(*args, file=line_stream(file), **kwargs)

    # ------------------------------------------------------------ collectives
    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_reduce_mean_(self, flat: torch.Tensor) -> torch.Tensor:
        """In place: the mean of `flat` over all processes (one collective call)."""
        if self.world_size > 1:
            torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
            flat.div_(self.world_size)
        return flat

    def any_true(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def max_over_ranks(self, values: list[float]) -> list[float]:
        """Each value's maximum over all processes (in float64; one collective call)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return t.tolist()

    def gather_ragged(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor from every rank in rank order; lengths may differ by rank."""
        values = values.detach().to(self.device, torch.float64).flatten()
        if self.world_size == 1:
            return values.cpu()
        length = torch.tensor([values.numel()], device=self.device)
        lengths = [torch.zeros_like(length) for _ in range(self.world_size)]
        torch_dist.all_gather(lengths, length)
        longest = int(max(int(n) for n in lengths))
        padded = torch.zeros(longest, dtype=values.dtype, device=self.device)
        padded[: values.numel()] = values
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, padded)
        return torch.cat([p[: int(n)] for p, n in zip(parts, lengths)]).cpu()

    def broadcast_object(self, obj):
        """rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn, failures: tuple[type, ...]):
        """``fn()`` on the main process only (writing a file, taking the run folder's lock); a
        failure of a ``failures`` type there is raised on every rank alike, so all stop together
        and only the main one says why. Returns ``fn()``'s value on the main process, else None."""
        value, failure = None, None
        if self.is_main:
            try:
                value = fn()
            except failures as err:
                err.raised_on_main = True  # the other ranks raise it too, but stay silent
                failure = err
        failure = self.broadcast_object(failure)  # also the barrier after the main's work
        if failure is not None:
            raise failure
        return value

    def parameters_in_sync(self, tensors) -> tuple[bool, list[str]]:
        """Compare a checksum of `tensors` across ranks (debug mode): (all equal, digests)."""
        digest = hashlib.sha256()
        for t in tensors:
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        mine = digest.hexdigest()[:16]
        if self.world_size == 1:
            return True, [mine]
        every = [None] * self.world_size
        torch_dist.all_gather_object(every, mine)
        return len(set(every)) == 1, every

    # ------------------------------------------------------------ trackers (main process only)
    def start_trackers(self, project: str, config: dict, wandb_kwargs: dict,
                       resumed_at: int = 0) -> None:
        """Start W&B and/or TensorBoard; `resumed_at`: the step a resumed run continues after."""
        if self.accelerator.log_with:
            if self._tensorboard is not None:
                self._tensorboard.resume_after(resumed_at)
            self.accelerator.init_trackers(project, config=config,
                                           init_kwargs={"wandb": wandb_kwargs})
            self._trackers_started = True

    def log(self, values: dict, step: int) -> None:
        if self._trackers_started:
            self.accelerator.log(values, step=step)

    def wandb_run_id(self) -> Optional[str]:
        if not self._trackers_started or not self.is_main or not self._wandb:
            return None
        return self.accelerator.get_tracker("wandb", unwrap=True).id

    def end(self) -> None:
        if self._trackers_started:
            self.accelerator.end_training()
            self._trackers_started = False
        elif torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    def exit(self, status: int) -> int:
        """End this process with `status`; call after `end()`, once everything is written.

        One process returns `status` to its caller (a command's ``command()`` then ends with
        signals.leave; a caller in Python goes on). A rank of a multi-process run leaves at once
        (signals.leave, which runs Python's exit handlers first): interpreter teardown after
        destroy_process_group can abort (SIGABRT, "terminate called without an active
        exception", from a C++ thread still joinable; seen on a two-machine gloo run in CI),
        which turns a finished run into a failed job (README, "A multi-node job"). Nothing is
        lost by skipping teardown: checkpoints and results are renamed into place, metrics files
        are closed after each write, and W&B was finished by `end()`."""
        if self.world_size == 1:
            return status
        leave(status)
