"""What the benchmarks ran on: the CPU's model name and speed-relevant ISA flags, and the
machine line of launch/bench.py (which --resume compares against the saved run's)."""

from __future__ import annotations

import os
import platform

import torch

from fsl_dist.cpu_malloc import chosen_allocator, reason_to_leave_alone, tcmalloc_path
from fsl_dist.meta.precision import cpu_flags

# CPU features that change the speed of these rows by large factors: two machines with the same
# model name ("Intel(R) Xeon(R) Processor") measured bf16 products at 63 and 2,137 GFLOP/s.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def read_cpuinfo() -> str | None:
    """/proc/cpuinfo's text, or None where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return None


def cpu_model(cpuinfo: str | None) -> str | None:
    """The ``model name`` of a /proc/cpuinfo text (the last one listed), or None without one."""
    names = [value.strip() for key, _, value in (line.partition(":") for line in
                                                 (cpuinfo or "").splitlines())
             if key.strip() == "model name"]
    return names[-1] if names else None


def cpu_description() -> str:
    """Model name and the speed-relevant ISA flags from /proc/cpuinfo (Linux), else platform's."""
    info = read_cpuinfo()
    if info is None:
        return platform.processor() or platform.machine()
    present = [f for f in SPEED_FLAGS if f in cpu_flags(info)]
    name = cpu_model(info) or platform.machine()
    return f"{name} ({' '.join(present) or 'none of ' + '/'.join(SPEED_FLAGS)})"


def machine_line(device, threads, allocator: str = "auto") -> str:
    cpu = torch.cuda.get_device_name() if device.type == "cuda" else cpu_description()
    line = (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python "
            f"{platform.python_version()}, device {device.type}, {threads} threads")
    if device.type == "cpu":  # part of what a row measured, so part of what --resume compares
        reason = reason_to_leave_alone()
        tuned_glibc = "with fsl_dist's glibc malloc settings and start tunables"
        line += ", fsl_dist rows " + (
            f"in the allocator as is ({reason})" if reason else
            f"under tcmalloc ({tcmalloc_path()})" if allocator == "tcmalloc" else
            f"{tuned_glibc}, memory-plan rows under tcmalloc ({tcmalloc_path()})"
            if chosen_allocator(allocator, True) == "tcmalloc" else tuned_glibc)
    return line
