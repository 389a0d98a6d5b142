"""Layers shared by the backbones."""

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

# Set while tasks run under torch.func.vmap: batch norm is then written out from mean and
# variance (see BatchStatNorm2d); elsewhere the native kernel is used, because it makes the
# meta-step faster (BENCHMARKS.md, "What each default buys").
_UNDER_VMAP = contextvars.ContextVar("fsl_dist_batch_norm_under_vmap", default=False)


@contextlib.contextmanager
def batch_norm_for_vmap():
    """Within this block, BatchStatNorm2d uses the written-out form that vmap differentiates
    exactly."""
    token = _UNDER_VMAP.set(True)
    try:
        yield
    finally:
        _UNDER_VMAP.reset(token)


# The inner step whose forward is running, for per-step batch-norm weights (MAML++'s BNWB).
# Set by the inner loop around each forward (``inner_step``); 0 outside any inner loop.
_INNER_STEP = contextvars.ContextVar("fsl_dist_inner_step", default=0)


@contextlib.contextmanager
def inner_step(k: int):
    """Within this block, per-step batch norms (``BatchStatNorm2d(steps=S)``) use set
    ``min(k, S - 1)``: forwards of inner step k use set k; the query forward after the last
    step (k = S - 1) uses the last set, as the reference code does; an inner loop longer than
    S (evaluation with more steps) keeps using the last set."""
    token = _INNER_STEP.set(k)
    try:
        yield
    finally:
        _INNER_STEP.reset(token)


def current_inner_step() -> int:
    """The inner step set by ``inner_step`` (0 outside any inner loop)."""
    return _INNER_STEP.get()


def per_step_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that hold one set per inner step (per-step batch norms)."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules()
            if isinstance(module, BatchStatNorm2d) and module.steps
            for name, _ in module.named_parameters(recurse=False)}


# Set by the trainer around a meta-training step of a model with per-step running statistics
# (MAML++'s BNRS): the norms add the batch statistics of their forwards to it.
_COLLECTOR = contextvars.ContextVar("fsl_dist_batch_stat_collector", default=None)

# The reference code's momentum of the per-step running statistics.
RUNNING_STATS_MOMENTUM = 0.1


class BatchStatCollector:
    """Sums of the batch statistics (mean, unbiased variance) each per-step norm saw, per inner
    step, over the forwards of one meta-training step that run with gradients (support forwards
    and query forwards after a step; not the no-grad query forward before adaptation)."""

    def __init__(self):
        self._sums: dict = {}  # norm -> ([steps, 2, C] sums, [steps] counts)

    def add(self, norm: "BatchStatNorm2d", k: int, mean: torch.Tensor, var: torch.Tensor):
        if norm not in self._sums:
            zeros = torch.zeros(norm.steps, 2, mean.numel(), dtype=mean.dtype,
                                device=mean.device)
            self._sums[norm] = (zeros, torch.zeros(norm.steps, dtype=mean.dtype,
                                                   device=mean.device))
        sums, counts = self._sums[norm]
        sums[k, 0] += mean
        sums[k, 1] += var
        counts[k] += 1

    def means(self, norms: list["BatchStatNorm2d"]) -> torch.Tensor:
        """This process's mean statistics, flat, in the order of ``norms``: per norm [steps, 2,
        C] (a step without forwards keeps its running values: NaN here marks it)."""
        parts = []
        for norm in norms:
            sums, counts = self._sums.get(norm, (None, None))
            if sums is None:
                parts.append(torch.full((norm.steps * 2 * norm.weight.shape[-1],), float("nan"),
                                        device=norm.running_mean.device))
                continue
            parts.append((sums / counts.view(-1, 1, 1)).reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0)


@contextlib.contextmanager
def collect_batch_stats():
    """Within this block, norms with running statistics add their batch statistics to the
    collector yielded (see ``update_running_stats``)."""
    collector = BatchStatCollector()
    token = _COLLECTOR.set(collector)
    try:
        yield collector
    finally:
        _COLLECTOR.reset(token)


@contextlib.contextmanager
def no_batch_stats():
    """Within this block nothing is collected: a forward recomputed for the backward
    (checkpointing) must not count its statistics a second time."""
    token = _COLLECTOR.set(None)
    try:
        yield
    finally:
        _COLLECTOR.reset(token)


def running_stats_norms(model: nn.Module) -> list["BatchStatNorm2d"]:
    """The norms of ``model`` that keep per-step running statistics, in module order."""
    return [m for m in model.modules() if isinstance(m, BatchStatNorm2d) and m.running_stats]


@torch.no_grad()
def update_running_stats(norms: list["BatchStatNorm2d"], means: torch.Tensor,
                         momentum: float = RUNNING_STATS_MOMENTUM) -> None:
    """``running = (1 - momentum) * running + momentum * mean`` per norm and step, ``means``
    as ``BatchStatCollector.means`` gives them (all-reduced over processes by the trainer);
    steps without forwards (NaN) keep their values."""
    offset = 0
    for norm in norms:
        size = norm.running_mean.numel() * 2
        step_means = means[offset:offset + size].view(norm.steps, 2, -1)
        offset += size
        for buffer, new in ((norm.running_mean, step_means[:, 0]),
                            (norm.running_var, step_means[:, 1])):
            new = new.to(buffer.dtype)
            seen = ~torch.isnan(new)
            buffer.copy_(torch.where(seen, (1 - momentum) * buffer + momentum * new, buffer))


class BatchStatNorm2d(nn.Module):
    """Batch normalisation that always uses the statistics of the batch it sees.

    Why batch statistics at meta-train and meta-test alike (the MAML convention, also
    torch.func's MAML example): every task is a tiny batch from classes never seen before,
    so running averages over other tasks describe the wrong distribution; normalising with
    the task's own statistics is what the meta-learned initialisation was trained with.
    There are no running buffers, so nothing changes in ``forward`` besides the output.

    Why it is written out from mean and variance under ``vmap`` (``batch_norm_for_vmap``)
    instead of calling ``F.batch_norm``:
    ``torch.func.vmap`` over tasks with ``torch.func.grad`` inside, differentiated from
    outside, gives wrong second-order gradients through PyTorch's native batch norm
    (functorch issue 534; the measured error is in docs/precision.md) while the losses look
    identical. Plain tensor ops are exact under every transform.

    The statistics are computed in float32 even under autocast: bf16 means and variances
    were the largest source of error in the mixed-precision meta-gradient.

    With ``steps`` = S > 0 (MAML++'s per-step batch-norm weights and biases, BNWB), ``weight``
    and ``bias`` have shape [S, C], one set per inner step, and a forward uses the set of the
    inner step it runs in (``inner_step``; set 0 outside an inner loop).

    With ``running_stats`` as well (MAML++'s BNRS; needs ``steps``): buffers ``running_mean``
    and ``running_var`` of shape [S, C], one pair per inner step, which meta-training updates
    (``collect_batch_stats``, ``update_running_stats``) and which a module in evaluation mode
    (``model.eval()``: ``evaluate_tasks``, prediction) normalises with, step k with pair k,
    instead of each batch's statistics. In training mode the batch's statistics are used, as
    without them.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, steps: int = 0,
                 running_stats: bool = False):
        super().__init__()
        if steps < 0:
            raise ValueError(f"steps must be 0 (off) or the number of inner steps, got {steps}")
        if running_stats and not steps:
            raise ValueError("per-step running statistics need per-step sets (steps > 0)")
        self.eps, self.steps, self.running_stats = eps, steps, running_stats
        shape = (steps, num_features) if steps else (num_features,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        if running_stats:
            self.register_buffer("running_mean", torch.zeros(shape))
            self.register_buffer("running_var", torch.ones(shape))

    def _affine(self):
        if not self.steps:
            return self.weight, self.bias
        k = min(_INNER_STEP.get(), self.steps - 1)
        return self.weight[k], self.bias[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        weight, bias = self._affine()
        if self.running_stats:
            k = min(_INNER_STEP.get(), self.steps - 1)
            if not self.training:
                mean, var = self.running_mean[k], self.running_var[k]
                scale = weight * torch.rsqrt(var + self.eps)
                return (x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + \
                    bias.view(1, -1, 1, 1)
            collector = _COLLECTOR.get()
            if collector is not None and torch.is_grad_enabled():
                if _UNDER_VMAP.get():
                    raise RuntimeError("per-step running statistics are collected on the loop "
                                       "path only (an in-place update cannot cross vmap)")
                var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), unbiased=True)
                collector.add(self, k, mean, var)
        if not _UNDER_VMAP.get():
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        steps = f", steps={self.steps}" if self.steps else ""
        steps += ", running_stats=True" if self.running_stats else ""
        return f"{self.weight.shape[-1]}, eps={self.eps}{steps}"
