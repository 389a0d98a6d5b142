"""Mixed precision for the inner and outer loops.

Autocast runs the body's convolutions in bf16 or fp16; the parts that measured
as precision-sensitive stay in float32: the inner update (float32 parameters minus float32
gradients), the batch-norm statistics (``BatchStatNorm2d``) and every loss (logits are cast
to float32 before the cross-entropy), and the linear head, whose inner updates bf16 would
round away. Plain autocast over everything gave a far worse meta-gradient (the measured
errors: docs/precision.md).

fp16 also needs loss scaling, and ``torch.autograd.grad`` does not go through a
``GradScaler``: the inner support loss is multiplied by ``inner_loss_scale`` before its
gradient is taken, and the gradient is divided by it in float32 before the update.
``InnerLossScaler`` keeps that scale dynamic, the way ``GradScaler`` does for the outer loss.
"""

import contextlib

import torch

PRECISIONS = ("no", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_factory(precision: str, device_type: str):
    """A zero-argument callable returning the autocast context for ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "no":
        return contextlib.nullcontext
    dtype = _DTYPES[precision]
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)


class InnerLossScaler:
    """Dynamic scale for the fp16 inner loss (the inner-loop analogue of ``GradScaler``).

    Pass ``inner_loss_scale=scaler.scale`` to ``meta_loss``; after the step, call
    ``scaler.update(found_nonfinite)`` with ``stats["inner_nonfinite"]`` reduced over ranks
    (every rank must see the same value so that all keep the same scale). A non-finite inner
    gradient halves the scale (the trainer skips that step); ``growth_interval`` finite steps
    in a row double it.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self._growth_tracker = 0

    def update(self, found_nonfinite: bool) -> None:
        if found_nonfinite:
            self.scale *= self.backoff_factor
            self._growth_tracker = 0
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self._growth_tracker = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "growth_tracker": self._growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_factor = state["growth_factor"]
        self.backoff_factor = state["backoff_factor"]
        self.growth_interval = state["growth_interval"]
        self._growth_tracker = state["growth_tracker"]


# CPU flags (/proc/cpuinfo) of native bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16, Arm BF16.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The ISA flags in a /proc/cpuinfo text: its ``flags`` (x86) and ``Features`` (Arm) lines."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_has_bf16_instructions(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes in bf16 natively, from the flags of ``cpuinfo`` (default:
    /proc/cpuinfo); None when unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = cpu_flags(cpuinfo)
    if not flags:
        return None
    return any(f in flags for f in BF16_CPU_FLAGS)


def bf16_cpu_warning(device_type: str, precision: str, cpuinfo: str | None = None) -> str | None:
    """A warning for bf16 on a CPU that has no bf16 instructions (None otherwise): there oneDNN
    emulates bf16 products and a meta-step is several times slower than in float32 (measured:
    BENCHMARKS.md, "What limits the numbers")."""
    if (device_type != "cpu" or precision != "bf16"
            or cpu_has_bf16_instructions(cpuinfo) is not False):
        return None
    return ("warning: precision=bf16 on a CPU without bf16 instructions (none of "
            f"{', '.join(BF16_CPU_FLAGS)} in /proc/cpuinfo): bf16 is emulated there and measured "
            "several times slower than float32 (BENCHMARKS.md); precision=no is faster here")
