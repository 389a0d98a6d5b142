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
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if not _UNDER_VMAP.get():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"
