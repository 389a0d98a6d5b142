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


def per_step_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that hold one set per inner step (per-step batch norms)."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules()
            if isinstance(module, BatchStatNorm2d) and module.steps
            for name, _ in module.named_parameters(recurse=False)}


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
    """

    def __init__(self, num_features: int, eps: float = 1e-5, steps: int = 0):
        super().__init__()
        if steps < 0:
            raise ValueError(f"steps must be 0 (off) or the number of inner steps, got {steps}")
        self.eps, self.steps = eps, steps
        shape = (steps, num_features) if steps else (num_features,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def _affine(self):
        if not self.steps:
            return self.weight, self.bias
        k = min(_INNER_STEP.get(), self.steps - 1)
        return self.weight[k], self.bias[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        weight, bias = self._affine()
        if not _UNDER_VMAP.get():
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        steps = f", steps={self.steps}" if self.steps else ""
        return f"{self.weight.shape[-1]}, eps={self.eps}{steps}"
