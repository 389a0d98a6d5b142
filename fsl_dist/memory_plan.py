"""``train.memory_budget_gb``: the fastest way to run a meta-step whose measured peak fits.

Before the first step (of every start, a resume included: the machine may have changed) the
trainer runs a probe step, a real meta-gradient of the real model on this rank's first task
batch, with no update, once per candidate ``Plan``:

- the path: tasks side by side in one ``vmap`` (in chunks of ``in_flight`` tasks) or a loop
  of ``in_flight`` worker threads, each running one task at a time (``meta_backward``);
- ``algorithm.checkpoint``: none, steps, blocks (second order only; blocks on models that
  split into ``features`` and ``classifier``);
- on CPU, fsl_dist's allocator settings (``cpu_malloc``) tuned or glibc's defaults.

Every candidate gives the default's meta-gradient: the loop sums its tasks' parts in task
order whatever ``in_flight`` is (bitwise on one intra-op thread; a task that runs alone on
several threads sums its convolutions in another order), vmap chunks and checkpoint levels
within float rounding (1e-6 relative). The probe leaves the run as it was: the random state,
the model's buffers and the gradients are restored, batch statistics are not collected, the
optimizer does not step, and the task batch is read again for the first step. A run whose
budget picks the default plan (or its twin: the allocator changes no arithmetic) is
therefore bitwise the run without a budget.

The peak is the process's, absolute, on the device that trains: on CPU the kernel's high-water
mark of the resident set (``VmHWM``), which the process resets before each probe
(``/proc/self/clear_refs``, Linux >= 4.0) after handing its free heap back (``malloc_trim``),
so each candidate's peak is exact and needs no child process (forking a process whose OpenMP
pool or CUDA context has started is not safe, and a fresh interpreter per candidate would
reload torch and the data); where that reset is refused, the monotonic ``ru_maxrss`` (a later
candidate may then read an earlier one's higher peak: too high, never too low). On CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. Added to it, counted
rather than measured: what the first update allocates (Adam's two moments unless a resumed
optimizer holds them, and the all-reduced gradient vector). What the process holds grows
with its first step by the library code that step's kernels run, which stays resident (file
pages, 38-47 MiB measured on CPU; any first step pays it, planned or not), and later probes
may need more after a tuned one left its heap fragmented; training starts from what the probes
left, so a plan chosen among others is probed once more, last, right before training, and
taken only if it fits again (else the next fastest). Before each uncapped probe, and before
training, the library code pages earlier probes paged in are handed back (``code_pages``), so
that a probe's peak, as training's, holds only the code of its own plan (log section 24: 37 MiB
handed back, 25 of it paged in again by training). A capped probe keeps them: its cap cannot see
file pages coming back.

Search: the default plan first; if it fits, nothing else is probed. On CPU the default's
allocator is tuned, whose step grows up to 3x its twin's, so the default's twin with glibc's
defaults (the same arithmetic; a lighter step that makes the kernels and pages in the library
code) is probed before it. **Capped** (one process, every plan one task at a time in the loop,
and ``can_cap``: one intra-op thread), every probe after the twin is capped at the budget
(``capped_at``: an allocation that would take the process past it fails, and the probe ends
as stopped instead of going over). If the twin fits, the tuned default is probed: capped, or
uncapped only if the twin fits with room for the tuned step's larger growth
(``TUNED_GROWTH``). If the tuned default fits, it is the plan; if it was stopped or not
risked, every other candidate is searched, the twin included (a lighter plan with the tuned
allocator may beat it; uncapped, each tuned one only after its own twin, with the same room:
``_probe_rest``); if it ran and did not fit, the twin, probed again. If the twin does
not fit, memory is short and only glibc-defaults plans are searched. **Checked** (one process
on more intra-op threads, where ``capping_works``): a tuned plan of one task at a time whose
twin fit without that room, the tuned default included, is measured capped on one thread
first and run on all only if it fit there (``Prober.checked``). Then the lightest plan,
unless one has fit already; if it does not fit either, the run is refused
(``MemoryPlanError``) naming what it needs. Otherwise the other candidates are probed a
checkpoint level at a time, coarsest first, leaving out a finer level where a coarser one of the
same path and allocator fit (tuned: any tuned plan), since it recomputes more; and the
one with the shortest probe step among those that fit is taken (each probe but a check runs
twice: the first warms up and scores before adaptation as a logging step does, the time is the
second's, which does not, as most steps do not; the peak the higher). Uncapped, a probe of a
plan that does not fit goes past the budget by what it needs beyond it
(docs/benchmarks/2026-12-05-memory-plan.md, section 17); one that runs out of the device's or
the machine's memory is stopped by that error, as one over the budget. Several processes:
every rank probes the same candidates and each peak and time is the maximum over ranks (one
collective per round), so every rank takes the same plan, or refuses alike. On a resume the
plan is made again: the machine, the processes or the budget may have changed, and no plan
changes the meta-gradient beyond rounding.

Under the tcmalloc of ``train.cpu_allocator`` (on CPU the default under a budget, where
installed; nothing to switch): ``anchored_search``, which in one process on one intra-op
thread probes the lightest plan first and stops every other probe of one task at a time at
the budget, and risks no other probe it expects past the budget.
"""

from __future__ import annotations

import contextlib
import gc
import math
import platform
import resource
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from fsl_dist import checkpoint as ckpt
from fsl_dist.code_pages import ResidentCode
from fsl_dist.cpu_malloc import (
    grow_heap_by_default_steps,
    heap_free_bytes,
    preloaded_tcmalloc,
    reason_to_leave_alone,
    release_free_memory,
    single_arena,
    tune_cpu_malloc,
)
from fsl_dist.meta import InnerLoopSpec
from fsl_dist.meta.objective import (
    default_task_workers,
    default_vectorize,
    pixels_per_task,
    splits_body_and_head,
)
from fsl_dist.meta.spec import CHECKPOINT_LEVELS
from fsl_dist.models.layers import collect_batch_stats

GB = 1e9  # as data.memory_budget_gb
PROBE_MARGIN = 0.005  # of the budget, kept free of the probed peak (plan_memory)
THREADS_MARGIN = 0.02  # the same, on CPU with several intra-op threads (probe_margin)


class MemoryPlanError(Exception):
    """No plan's measured peak fits ``train.memory_budget_gb`` (exit code ``EXIT_NO_PLAN``)."""


@dataclass(frozen=True)
class Plan:
    """How a meta-step runs; none of it changes the meta-gradient beyond float rounding."""

    vectorize: bool  # tasks through one vmap (True) or a loop (False)
    in_flight: int  # loop: worker threads (tasks side by side); vmap: tasks per vmap call
    checkpoint: str  # algorithm.checkpoint's level
    malloc: Optional[str] = None  # CPU: "tuned" or "defaults"; None: left as it is

    @property
    def name(self) -> str:
        path = (f"vmap, {self.in_flight} tasks per call" if self.vectorize else
                f"loop, {self.in_flight} task{'s' if self.in_flight > 1 else ''} at a time")
        malloc = {"tuned": ", cpu malloc tuned", "defaults": ", cpu malloc glibc defaults"}
        return f"{path}, checkpoint {self.checkpoint}{malloc.get(self.malloc, '')}"

    def as_dict(self) -> dict:
        return {"vectorize": self.vectorize, "in_flight": self.in_flight,
                "checkpoint": self.checkpoint, "malloc": self.malloc}


@dataclass(frozen=True)
class Probe:
    """One candidate's measured probe step: peak bytes (with the update's), seconds, the bytes
    the process held before the step (torch, the data, the model) and after it, its free
    memory handed back (more than before when the step was the process's first: the library
    code its kernels run stays resident)."""

    plan: Plan
    peak: float  # math.inf: stopped at the budget (``capped_at``), the need unmeasured
    seconds: float
    before: float = 0.0
    after: float = 0.0
    heap_free: float = 0.0  # glibc's free heap bytes when the step began (see capped_at)
    threads: int = 0  # intra-op threads it ran on where fewer than the run's (a check); 0: all

    @property
    def growth(self) -> float:
        """What the step itself adds to what the process holds once it has run a step."""
        return self.peak - max(self.before, self.after)

    @property
    def stopped(self) -> bool:
        return math.isinf(self.peak)

    def as_dict(self, budget: float) -> dict:
        return {"plan": self.plan.name,
                "peak_gb": None if self.stopped else round(self.peak / GB, 4),
                "stopped_at_budget": self.stopped,
                "before_gb": round(self.before / GB, 4), "after_gb": round(self.after / GB, 4),
                "heap_free_gb": round(self.heap_free / GB, 4),
                "seconds": None if self.stopped else round(self.seconds, 4),
                "intra_op_threads": self.threads or torch.get_num_threads(),
                "fits": self.peak <= budget}


# ---------------------------------------------------------------- candidates


def _halvings(n: int) -> list[int]:
    """n, n/2, ... 1 (rounded up), without repeats."""
    out = [n]
    while out[-1] > 1:
        out.append((out[-1] + 1) // 2)
    return out


def candidates(cfg, model: torch.nn.Module, device: torch.device, n_tasks: int,
               task_pixels: int) -> list[Plan]:
    """The plans to search, the default (today's plan without a budget) first, the lightest
    last, the rest in the order expected fastest first (the order breaks ties in time).

    vmap is a candidate only where it is the default (CUDA) or asked for: on CPU the loop was
    measured faster at about half the memory (BENCHMARKS.md). An explicit
    ``algorithm.vectorize`` fixes the path; the configured checkpoint level is the heaviest
    searched."""
    algo = cfg.algorithm
    implicit = algo.meta_gradient == "implicit"
    fixed_loop = algo.checkpoint != "none" or implicit or algo.vectorize is False
    default_vmap = (not fixed_loop and (algo.vectorize or (
        algo.vectorize is None and default_vectorize(device, model))))
    levels = [algo.checkpoint]
    if not algo.first_order and not implicit:
        levels = list(CHECKPOINT_LEVELS[CHECKPOINT_LEVELS.index(algo.checkpoint):])
        if not splits_body_and_head(model):
            levels = [lv for lv in levels if lv != "blocks"]
    mallocs: list[Optional[str]] = [None]
    if device.type == "cpu" and cfg.train.tune_cpu_malloc and reason_to_leave_alone() is None:
        mallocs = ["tuned", "defaults"]
    workers = default_task_workers(device, task_pixels)
    plans = []
    for malloc in mallocs:
        if default_vmap:
            plans += [Plan(True, n, "none", malloc) for n in _halvings(n_tasks)]
        if algo.vectorize is not True or fixed_loop:
            plans += [Plan(False, w, level, malloc) for level in levels
                      for w in _halvings(workers)]
    default = Plan(bool(default_vmap), n_tasks if default_vmap else workers, algo.checkpoint,
                   mallocs[0])
    rest = [p for p in plans if p != default]
    lightest = min(rest, key=_lightness) if rest else None
    ordered = [p for p in rest if p != lightest]
    return [default] + ordered + ([lightest] if lightest else [])


def _lightness(plan: Plan) -> tuple:
    """Smaller is expected lighter: glibc's defaults, fewer tasks in flight, a finer level."""
    return (plan.malloc == "tuned", plan.in_flight, -CHECKPOINT_LEVELS.index(plan.checkpoint),
            plan.vectorize)


# ---------------------------------------------------------------- the choice


Check = Callable[[Plan, Probe], list[Probe]]


def search(plans: list[Plan], measure: Callable[[list[Plan]], list[Probe]],
           budget: float, capped: bool = False,
           check: Optional[Check] = None) -> tuple[Optional[Plan], list[Probe]]:
    """(the chosen plan or None, every probe) for ``budget`` bytes; ``measure(plans, capped)``
    probes a round of plans (``candidates``' order: default first, lightest last); ``capped``:
    every probe after the first (the default's twin, which makes the kernels) is stopped at the
    budget (``capped_at``) instead of going past it. ``check(plan, its twin's probe)``
    (uncapped only; ``Prober.checked``): the probes of a tuned plan of one task at a time
    whose twin fit without room for it, checked capped on one thread before it runs on all;
    a probe on fewer threads than the run's (``Probe.threads``) is never a plan's measure.

    The default first (``_try_default``); if it does not fit, the lightest, then the rest
    (``_probe_rest``). A plan chosen among others is probed once more, last, in the state
    training starts from (what earlier probes left in the heap included), and taken only if it
    fits again."""
    chosen, probes, pool = _try_default(plans, measure, budget, capped, check)
    if chosen is not None:
        return chosen, probes
    probed, lightest = {p.plan for p in probes}, pool[-1]
    if lightest not in probed and not any(p.peak <= budget for p in _on_all_threads(probes)):
        probes += measure([lightest], capped=capped)  # if even it does not fit, nothing will
        if probes[-1].peak > budget:
            return None, probes
        probed.add(lightest)
    probes += _probe_rest([p for p in pool if p not in probed], probes, measure, budget, capped,
                          check)
    return _fastest_confirmed(pool, probes, measure, budget, capped)


def _fastest_confirmed(pool: list[Plan], probes: list[Probe], measure, budget: float,
                       capped: bool = False) -> tuple[Optional[Plan], list[Probe]]:
    """The fastest plan of ``pool`` whose latest probe fit, probed once more unless that probe
    was the last (the confirmation, in the state training starts from); the next fastest where
    it no longer fits."""
    order = {plan: i for i, plan in enumerate(pool)}
    latest = _latest(probes)
    fitting = sorted((p for p in latest.values() if p.peak <= budget and p.plan in order),
                     key=lambda p: (p.seconds, order[p.plan]))
    for probe in fitting:
        if probes[-1].plan != probe.plan or not _on_all_threads(probes[-1:]):
            probes += measure([probe.plan], capped=capped)  # the confirmation
        if probes[-1].peak <= budget:
            return probe.plan, probes
    return None, probes


def anchored_search(plans: list[Plan], measure: Callable[..., list[Probe]], budget: float,
                    capped: bool = False) -> tuple[Optional[Plan], list[Probe]]:
    """``search`` for an allocator fsl_dist does not switch (tcmalloc). One task at a time at
    the configured level first (the anchor); a plan of n tasks in flight at that level only
    where n times the anchor's growth fits (tcmalloc's peak grows about with the tasks held:
    116 and 208 MiB for 1 and 2, docs/benchmarks/2026-12-05-memory-plan.md, section 28); where
    the anchor does not fit, the finer levels of one task at a time, coarsest first, until one
    fits. The fastest that fit, probed once more (``search``'s confirmation).

    ``capped`` (one process on one intra-op thread): the lightest plan of one task at a time
    (the finest level) is probed first, uncapped: it makes the kernels every such plan runs,
    with the least memory; the anchor, the finer levels and the confirmation are then capped at
    the budget, so a heavy anchor (84x84, several inner steps) is stopped there instead of
    running past it. Not capped, the anchor's probe runs first, as the glibc search's does."""
    one_at_a_time = [p for p in plans if not p.vectorize and p.in_flight == 1]
    anchor = next((p for p in one_at_a_time if p.checkpoint == plans[0].checkpoint), None)
    if anchor is None:
        return search(plans, measure, budget)
    lightest = max(one_at_a_time, key=lambda p: CHECKPOINT_LEVELS.index(p.checkpoint))
    probes: list[Probe] = []
    lighter = None
    if capped and lightest != anchor:
        probes += measure([lightest])
        lighter = probes[-1]
        if lighter.peak > budget:
            return None, probes  # no plan is lighter

    def probed(plan: Plan) -> Probe:
        """``plan``'s probe: capped once the lightest plan's has made the kernels."""
        if lighter is not None and plan == lightest:
            return lighter
        probes.extend(measure([plan], capped=lighter is not None))
        return probes[-1]

    first = probed(anchor)
    if first.peak <= budget:
        held = max(first.before, first.after)
        wider = [p for p in plans if p.checkpoint == anchor.checkpoint and p != anchor
                 and held + p.in_flight * first.growth <= budget]
        probes += measure(wider) if wider else []
    else:
        for plan in one_at_a_time:
            if plan != anchor and probed(plan).peak <= budget:
                break
    return _fastest_confirmed(plans, probes, measure, budget, capped=capped)


def _on_all_threads(probes: list[Probe]) -> list[Probe]:
    return [p for p in probes if not p.threads]


def _latest(probes: list[Probe]) -> dict:
    """Each plan's last probe on all threads: what it needs now."""
    return {p.plan: p for p in _on_all_threads(probes)}


def _fit_on_all_threads(probe: Probe, budget: float) -> bool:
    return probe.peak <= budget and not probe.threads


def _checkable(plan: Plan, check: Optional[Check]) -> bool:
    return check is not None and plan.malloc == "tuned" and not plan.vectorize \
        and plan.in_flight == 1


def _probe_rest(rest: list[Plan], probes: list[Probe], measure, budget: float,
                capped: bool, check: Optional[Check] = None) -> list[Probe]:
    """The probes of ``rest``, level by level, coarsest first (``_not_finer_than_a_fit``).
    Capped, each level's plans are probed in one round. Uncapped, the glibc-defaults plans
    first; then, level by level, a tuned plan is probed after its glibc-defaults twin (probed
    now if the first pass left it out) and only where the twin fits with room for the tuned
    step's growth (``room_for_tuned``), as the default is: a probe of a plan that does not fit
    would go past the budget. Where the twin fits without that room, a tuned plan of one task
    at a time is ``check``ed."""
    if capped:
        return _by_level(rest, probes, measure, budget, capped=True)
    done = _by_level([p for p in rest if p.malloc != "tuned"], probes, measure, budget)
    for level in CHECKPOINT_LEVELS:
        latest = _latest(probes + done)
        wanted = [p for p in rest if p.malloc == "tuned" and p.checkpoint == level
                  and _not_finer_than_a_fit(p, latest, budget)]
        unprobed = [twin for twin in (replace(p, malloc="defaults") for p in wanted)
                    if twin not in latest and twin in rest]
        done += measure(unprobed) if unprobed else []
        latest = _latest(probes + done)
        twins = {p: latest.get(replace(p, malloc="defaults")) for p in wanted}
        fitting = {p: twin for p, twin in twins.items() if twin is not None and twin.peak <= budget}
        roomy = [p for p, twin in fitting.items() if room_for_tuned(twin, budget)]
        done += measure(roomy) if roomy else []
        done += [probe for plan, twin in fitting.items()
                 if plan not in roomy and _checkable(plan, check) for probe in check(plan, twin)]
    return done


def _by_level(plans: list[Plan], probes: list[Probe], measure, budget: float,
              capped: bool = False) -> list[Probe]:
    """The probes of ``plans``, one round per checkpoint level, coarsest first, each round
    without the plans ``_not_finer_than_a_fit`` leaves out."""
    done: list[Probe] = []
    for level in CHECKPOINT_LEVELS:
        latest = _latest(probes + done)
        round_ = [p for p in plans
                  if p.checkpoint == level and _not_finer_than_a_fit(p, latest, budget)]
        done += measure(round_, capped=capped) if round_ else []
    return done


def _not_finer_than_a_fit(plan: Plan, latest: dict, budget: float) -> bool:
    """False where a coarser checkpoint level already fit on all threads: of the same path and
    allocator, or (a tuned plan) any tuned plan. A finer level recomputes more, so it is
    expected slower, and its probe can leave more in the process: a blocks probe left 9 MB,
    which training then carried (docs/benchmarks/2026-12-05-memory-plan.md, section 23)."""
    level = CHECKPOINT_LEVELS.index(plan.checkpoint)
    return not any(
        probe.peak <= budget and CHECKPOINT_LEVELS.index(other.checkpoint) < level
        and other.malloc == plan.malloc
        and (plan.malloc == "tuned" or (other.vectorize, other.in_flight)
             == (plan.vectorize, plan.in_flight))
        for other, probe in latest.items())


# Where tuned probes cannot be capped (``can_cap``): a tuned step grew up to 2.9x its twin's
# (above what the process held) in the measured pairs (docs/benchmarks/2026-12-05-memory-plan.md,
# sections 3 and 11), so the default's probe is risked only with room for this much.
TUNED_GROWTH = 3.0


def room_for_tuned(twin: Probe, budget: float) -> bool:
    """Whether the budget leaves room for the tuned default, judged from its twin's probe:
    the step's own growth, above what the process holds once a step has run (the first step
    leaves the library code its kernels ran resident, 38-47 MiB measured; not the step's)."""
    return max(twin.before, twin.after) + TUNED_GROWTH * twin.growth <= budget


def _try_default(plans: list[Plan], measure, budget: float, capped: bool = False,
                 check: Optional[Check] = None):
    """(the default, or its twin, if either fits; the probes; the plans left to search).

    A default with the tuned allocator goes after its glibc-defaults twin (the same
    arithmetic; a lighter step, which makes the kernels and pages in the library code). If the
    twin fits, the tuned default is probed: capped at the budget where ``capped`` (right after
    the twin, whose heap holds few free chunks, the cap is all but exact), otherwise only with
    room to spare for the tuned step's larger growth (``room_for_tuned``). If it is stopped, or
    not risked, every other plan is searched, the twin included (a lighter tuned plan may beat
    it); if it ran and did not fit, the twin, probed again. If the twin does not fit, memory is
    short, and only glibc-defaults plans are searched, and those ``check`` takes (the tuned
    default among them, also where the twin fits without room for it)."""
    default = plans[0]
    if default.malloc != "tuned":
        probes = measure([default])
        return (default if probes[-1].peak <= budget else None), probes, plans
    twin = replace(default, malloc="defaults")
    probes = measure([twin])
    short = [twin] + [p for p in plans
                      if (p.malloc != "tuned" or _checkable(p, check)) and p != twin]
    if probes[-1].peak > budget:
        return None, probes, short
    others = [p for p in plans if p != default]
    if not capped and not room_for_tuned(probes[-1], budget):
        if _checkable(default, check):
            probes += check(default, probes[-1])
            if _fit_on_all_threads(probes[-1], budget):
                return default, probes, plans
        return None, probes, others
    probes += measure([default], capped=capped)
    if probes[-1].peak <= budget:
        return default, probes, plans
    if probes[-1].stopped:
        return None, probes, others
    probes += measure([twin], capped=capped)  # again, in the heap the tuned probe left
    if probes[-1].peak <= budget:
        return twin, probes, plans
    return None, probes, short


def probe_margin(device: torch.device) -> float:
    """The share of the budget kept free of a probed peak, for what a probe step does not see.
    On one thread a training step peaked 1.8 MB (0.15%) above its probe at 1.14 GB; on CPU with
    several intra-op threads the same step's peak spreads by tens of MB within one process, and
    training went up to 21 MB above its probe near 1 GB (docs/benchmarks/2026-12-05-memory-plan.md,
    sections 10, 20, 24)."""
    if device.type == "cpu" and torch.get_num_threads() > 1:
        return THREADS_MARGIN
    return PROBE_MARGIN


def refusal(budget_gb: float, probes: list[Probe], margin: float = PROBE_MARGIN) -> str:
    """The one line of a budget that no plan fits, naming the smallest need measured, each
    plan's by its latest probe: a plan that fit once may have failed its confirmation in the
    heap later probes left, and its first need, within the budget, would read as a contradiction.
    """
    latest = {p.plan: (i, p) for i, p in enumerate(probes)}
    # a tie: the plan probed later (the lighter)
    smallest = min(latest.values(), key=lambda ip: (ip[1].peak, -ip[0]))[1]
    need = ("needs more than the budget (its probe step was stopped at it)" if smallest.stopped
            else f"needs {smallest.peak / GB:.3g} GB per process")
    return (f"no way to run a meta-step fits train.memory_budget_gb={budget_gb:g}: the smallest "
            f"plan ({smallest.plan.name}) {need} "
            f"({smallest.before / GB:.3g} GB held before the step, measured on a probe step; "
            f"{margin:.1%} of the budget is kept free for what a probe does not see); "
            f"raise the budget, or make a task lighter "
            f"(task.q_query, model.width, fewer algorithm.inner_steps, algorithm.first_order)")


# ---------------------------------------------------------------- measuring


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def held_bytes(device: torch.device) -> float:
    """Bytes the process holds now: the resident set on CPU, torch's allocated memory on
    CUDA."""
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    try:
        return float(status_bytes("VmRSS"))
    except OSError:
        return 0.0


def reset_peak(device: torch.device) -> bool:
    """Start a new peak measurement; False where the peak cannot be reset (then the peak read
    is the process's highest so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def read_peak(device: torch.device) -> float:
    """Bytes: the peak since ``reset_peak``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    try:
        return float(status_bytes("VmHWM"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux: KiB


def update_bytes(state) -> float:
    """What the first update adds to a step's peak: the all-reduced gradient vector, and
    Adam's two moments unless the optimizer already holds them (a resumed run)."""
    params = state.trainable()
    size = sum(p.numel() * p.element_size() for p in params)
    return float(size * (1 if state.optimizer.state else 3))


def can_cap(device: torch.device) -> bool:
    """Whether probes on the run's intra-op threads can be stopped at the budget
    (``capped_at``): where ``capping_works`` and on one thread. Not with more: an allocation
    refused in a thread of an OpenMP team cannot reach the caller, and a process was seen to
    abort (docs/benchmarks/2026-12-05-memory-plan.md, section 16); on one, everything runs in
    the caller's thread. With more, a probe can still be capped on one (``Prober.checked``)."""
    return torch.get_num_threads() == 1 and capping_works(device)


def capping_works(device: torch.device) -> bool:
    """Whether ``capped_at`` can stop a step on one intra-op thread: on CPU, with glibc 2.33 or
    later (``mallinfo2``) as an allocator fsl_dist may set, on Linux 4.7 or later (where
    ``RLIMIT_DATA`` counts private mappings, not only the heap's break)."""
    if device.type != "cpu" or heap_free_bytes() is None:
        return False
    try:
        version = tuple(int(part) for part in platform.release().split(".")[:2])
    except ValueError:
        return False
    return version >= (4, 7)


@contextlib.contextmanager
def capped_at(budget: float, slack: float, tuned: bool = True):
    """Within: the process's resident set may not grow past ``budget`` + ``slack`` bytes; an
    allocation that would take it there fails, and torch raises (``out_of_memory``).

    The kernel caps the data segment (``RLIMIT_DATA``: the heap and the private mappings) at
    what it holds now plus what the resident set has left under ``budget``. The resident set
    grows about as much as the data segment does, so a step whose peak fits the budget is not
    stopped. The heap's free chunks are the exception: mapped but not resident
    (``release_free_memory`` handed their pages back), they refill without growing the data
    segment. ``slack`` of them is allowed for and the rest taken from the room, which holds
    the step within ``budget`` + ``slack`` while they are fewer than the room (a step that
    cannot reuse them may be stopped short of the budget). Not counted: library code a step
    pages in (file pages). The heap grows by glibc's default top pad meanwhile (the tuned
    1 GiB would reach the cap at once), and after by the tuned one again where ``tuned``.

    For the caller to make sure of: no other thread allocates meanwhile (a refused allocation
    in a thread of an OpenMP team or a communication thread can abort the process: one
    intra-op thread, one process), and no oneDNN kernel is made under the cap (one that fails
    to allocate breaks every later new kernel: a step with the same convolutions runs uncapped
    first, as the default's twin does for every plan the search caps)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    holes = max(0.0, (heap_free_bytes() or 0) - slack)
    room = max(0.0, budget - status_bytes("VmRSS") - holes)
    limit = int(status_bytes("VmData") + room)
    for ceiling in (soft, hard):
        if ceiling != resource.RLIM_INFINITY:
            limit = min(limit, ceiling)
    grow_heap_by_default_steps()
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        if tuned:
            tune_cpu_malloc(True)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation the process was refused (the cap of ``capped_at``, or
    the device's or machine's memory ran out): torch's CPU allocator, CUDA's, C++'s ``new``,
    Python's own, or a thread that could not start."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(sign in text for sign in (
        "can't allocate memory", "Cannot allocate memory", "bad_alloc",
        "can't start new thread"))


def accumulators(params) -> list:
    """The autograd nodes that accumulate ``params``' gradients, made now if no graph holds
    them. Held, a step reuses them instead of making new ones: a parameter keeps only a weak
    reference to its node, whose block stays allocated as long as the parameter lives, so a
    node made late in a refused step would pin the top of the heap and every free chunk below
    it (docs/benchmarks/2026-12-05-memory-plan.md, section 16)."""
    return [p.view_as(p).grad_fn.next_functions[0][0] for p in params if p.requires_grad]


def _in_own_thread(measure: Callable[[], tuple[float, float]],
                   cap: Optional[tuple[float, float]], tuned: bool,
                   threads: int = 0) -> tuple[float, float]:
    """``measure()`` under ``capped_at(*cap, tuned)`` (``cap`` None: uncapped), in a thread of
    its own on ``threads`` intra-op threads (0: the caller's count): (peak, seconds), or
    (inf, inf) when an allocation was refused.

    The thread starts before the cap (one that cannot start leaves its starter waiting), and
    ends after it: its cache of small freed blocks (glibc's tcache, per thread) then goes back to
    the heap. Kept in a long-lived thread, the blocks last freed, at the top of the heap, would
    keep it from shrinking: 80-100 MB of free chunks measured after a stopped probe, which later
    probes pay for (docs/benchmarks/2026-12-05-memory-plan.md, section 16). So the step's
    tensors are freed in the thread too, the refusal's traceback with them."""
    go, outcome = threading.Event(), {}
    threads = threads or torch.get_num_threads()

    def run():
        # OpenMP's thread count is per thread: a new one starts from the machine's, and oneDNN
        # would make kernels for it (under the cap) instead of using the caller's.
        torch.set_num_threads(threads)
        go.wait()
        try:
            outcome["measured"] = measure()
        except (RuntimeError, MemoryError) as error:
            if out_of_memory(error):
                outcome["measured"] = (math.inf, math.inf)
            else:
                outcome["error"] = error  # a bug: raised again below, with its traceback
        gc.collect()  # what the step left in reference cycles, freed in this thread too
    thread = threading.Thread(target=run, name="fsl_dist-probe")
    thread.start()
    try:
        with capped_at(*cap, tuned=tuned) if cap else contextlib.nullcontext():
            go.set()
            while thread.is_alive() and "measured" not in outcome and "error" not in outcome:
                thread.join(0.05)
    finally:
        go.set()
        thread.join()
    if "error" in outcome:
        raise outcome.pop("error")
    return outcome["measured"]


class Prober:
    """Runs probe steps of ``state``'s model on ``tasks`` (this rank's first batch); each
    round's peaks and times are the maxima over ranks. ``cap``: (budget, slack) bytes at which
    a capped round's probes are stopped (``capped_at``; a stopped probe's peak is
    ``math.inf``), or None: never capped. ``code``: the library pages resident before the
    first probe; those paged in since are handed back before each uncapped probe.

    A capped probe should only run kernels made before the cap: a convolution kernel of oneDNN
    that fails to allocate while it is being made breaks every later new kernel in the process
    (measured). The search caps every probe after the first, the default's twin, whose
    convolutions are those of every plan on one thread (one task at a time; a checkpoint level
    recomputes the same ones)."""

    def __init__(self, state, tasks: dict, cfg, precision: str, dist, repeats: int = 2,
                 cap: Optional[tuple[float, float]] = None,
                 code: Optional[ResidentCode] = None):
        self.state, self.tasks, self.cfg, self.precision = state, tasks, cfg, precision
        self.dist, self.repeats, self.cap, self.code = dist, repeats, cap, code
        self.device = dist.device
        self.more_on_all_threads: Optional[float] = None  # see checked

    def __call__(self, plans: list[Plan], capped: bool = False, threads: int = 0) -> list[Probe]:
        measured = [self.probe(plan, capped, threads) for plan in plans]
        n = len(plans)
        flat = self.dist.max_over_ranks([value for m in zip(*measured) for value in m])
        columns = [flat[i * n:(i + 1) * n] for i in range(5)]
        extra = update_bytes(self.state)
        return [Probe(plan, peak + extra, secs, base, held, free, threads)
                for plan, peak, secs, base, held, free in zip(plans, *columns)]

    def checked(self, plan: Plan, twin: Probe) -> list[Probe]:
        """The probes of a tuned ``plan`` of one task at a time where probes on the run's
        threads cannot be capped (``can_cap``): capped on one intra-op thread, the check, and
        only if that fit, uncapped on all (its time, and its peak there). ``twin``: the probe
        of ``plan``'s glibc-defaults twin, which fit.

        One step each (the run on all threads repeats as every probe does). The first check
        follows the twin's step on one thread, uncapped: it makes the kernels for one thread (a
        kernel made under the cap could break every later one; plans of one task at a time run
        the same convolutions), and what the twin needed more on all threads than on one lowers
        the checks' cap. A sign, not a bound: the same step measured from 11 MB lighter to 30 MB
        heavier on one thread than on two (docs/benchmarks/2026-12-05-memory-plan.md, section
        20), so the run on all threads is measured itself before the search may take it."""
        probes = []
        if self.more_on_all_threads is None:
            probes += self([twin.plan], threads=1)
            self.more_on_all_threads = max(0.0, twin.peak - probes[-1].peak)
        probes += self([plan], capped=True, threads=1)
        if probes[-1].peak > self.cap_on(1)[0]:
            return probes
        return probes + self([plan])

    def cap_on(self, threads: int) -> tuple[float, float]:
        """``self.cap``, lowered on fewer threads than the run's by ``more_on_all_threads``."""
        budget, slack = self.cap
        return (budget - (self.more_on_all_threads or 0.0) if threads else budget), slack

    def probe(self, plan: Plan, capped: bool = False,
              threads: int = 0) -> tuple[float, float, float, float, float]:
        """(peak bytes, seconds of the last repeat, bytes before, bytes after, free heap bytes
        before) of ``plan``'s meta-gradient; the first repeat warms up, the peak is the highest
        of all (the tuned allocator's may creep). The first repeat also scores the query set
        before adaptation, as a logging step does (its peak counts); the later ones do not, as
        most training steps do not (their time counts). ``capped``: the probe is capped at
        ``cap_on(threads)`` (``math.inf`` when stopped there); ``threads``: fewer intra-op
        threads than the run's to run on, in a thread of its own (0: the run's)."""
        if plan.malloc is not None:
            tune_cpu_malloc(plan.malloc == "tuned")
        capping = capped and self.cap is not None
        if capping:  # so that nothing made before the cap reserves the tuned 1 GiB of heap
            grow_heap_by_default_steps()
        with kept(self.state):
            gc.collect()
            release_free_memory()
            if self.code is not None and not capping:
                # Earlier probes' code would count in this one's peak, not in training's (its
                # pages come back as it runs them). Capped, it stays: the cap cannot see it.
                self.code.release()
            reset_peak(self.device)
            before = read_peak(self.device)
            heap_free = float(heap_free_bytes() or 0) if self.device.type == "cpu" else 0.0
            # made before the cap and held through it (see accumulators)
            held = accumulators(self.state.trainable()) if capping else []
            if capping or threads:
                cap = self.cap_on(threads) if capping else None
                # on fewer threads one step: its peak is what it runs for, and on one thread of
                # many a step is that many times slower
                steps = 1 if threads else self.repeats
                peak, seconds = _in_own_thread(lambda: self.repeat(plan, steps), cap,
                                               plan.malloc == "tuned", threads)
            else:
                peak, seconds = self.uncapped(plan)
            for p in self.state.trainable():
                p.grad = None
            del held
            gc.collect()
            release_free_memory()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # what a stopped probe left cached
            after = held_bytes(self.device)
        return peak, seconds, before, after, heap_free

    def uncapped(self, plan: Plan) -> tuple[float, float]:
        """``repeat(plan)``, or (inf, inf), stopped, where the device's or the machine's memory
        ran out: a plan that needs more than there is does not fit, as one over the budget."""
        try:
            return self.repeat(plan)
        except (RuntimeError, MemoryError) as error:
            if not out_of_memory(error):
                raise
        return math.inf, math.inf  # out of the except block: its frames' tensors are freed

    def repeat(self, plan: Plan, repeats: int = 0) -> tuple[float, float]:
        """(peak bytes, seconds of the last) of ``repeats`` (0: ``self.repeats``) probe steps
        of ``plan``."""
        peak, seconds = 0.0, 0.0
        for repeat in range(repeats or self.repeats):
            started = time.perf_counter()
            self.step(plan, acc_before=repeat == 0)
            peak = max(peak, read_peak(self.device))
            seconds = time.perf_counter() - started
            for p in self.state.trainable():
                p.grad = None
        return peak, seconds

    def step(self, plan: Plan, acc_before: bool = True) -> None:
        state, learner = self.state, self.state.learner
        fp16 = self.precision == "fp16"
        chosen, learner.plan = learner.plan, plan
        try:
            with collect_batch_stats():  # collected statistics are dropped
                learner.meta_backward(self.tasks, step=state.step, precision=self.precision,
                                      acc_before=acc_before,
                                      loss_scale=state.outer_scaler.scale if fp16 else 1.0,
                                      inner_loss_scale=state.inner_scaler.scale if fp16
                                      else None)
        finally:
            learner.plan = chosen


class kept:
    """Within: the random state and the model's buffers are as before afterwards."""

    def __init__(self, state):
        self.state = state

    def __enter__(self):
        self.rng = ckpt.rng_state()
        self.buffers = {n: b.clone() for n, b in self.state.model.named_buffers()}

    def __exit__(self, *exc):
        ckpt.set_rng_state(self.rng)
        with torch.no_grad():
            for name, buffer in self.state.model.named_buffers():
                buffer.copy_(self.buffers[name])
        return False


def plan_arguments(plan: Optional[Plan]) -> dict:
    """``meta_backward``'s keyword arguments for ``plan`` (none: its defaults)."""
    if plan is None:
        return {}
    return {"chunk": plan.in_flight} if plan.vectorize else {"workers": plan.in_flight}


def apply_to_spec(spec: InnerLoopSpec, plan: Optional[Plan]) -> InnerLoopSpec:
    return spec if plan is None else spec.replace(vectorize=plan.vectorize,
                                                  checkpoint=plan.checkpoint)


def _twin_as_it_fit(probes: list[Probe], prober, usable: float, slack: float,
                    device: torch.device) -> Optional[Plan]:
    """After a capped search that found nothing: the default's twin, probed again uncapped if
    its first probe (the one uncapped) grew the process by little enough to fit now and the
    heap holds no more free chunks than then; None otherwise.

    The cap leaves the heap's free chunks out of its room (``capped_at``), so a plan can be
    stopped short of the budget: the twin's confirmation was, in a training process whose heap
    held 50 MiB free before planning (docs/benchmarks/2026-12-05-memory-plan.md, section 19).
    In a heap as it was, the twin's step grows the process as much as it did then."""
    twin = probes[0]
    if twin.peak > usable or not any(p.stopped for p in probes):
        return None
    gc.collect()
    release_free_memory()
    fuller = (heap_free_bytes() or 0) > twin.heap_free + slack
    if fuller or held_bytes(device) + twin.growth > usable:
        return None
    probes += prober([twin.plan])
    return twin.plan if probes[-1].peak <= usable else None


def refuse(line: str):
    error = MemoryPlanError(line)
    error.raised_on_main = True  # every rank refuses alike (the same maxima); the main says it
    raise error


def plan_memory(state, tasks: dict, cfg, precision: str, dist) -> tuple[Plan, dict]:
    """The plan for ``cfg.train.memory_budget_gb`` and its record for run.json; raises
    ``MemoryPlanError`` when none fits. Prints the choice in one line (main process)."""
    budget_gb = cfg.train.memory_budget_gb
    budget = budget_gb * GB
    device = dist.device
    # The process's peak so far (torch, the data, the model), before any reset: no plan undoes
    # it. The highest over ranks, so that every rank decides alike.
    started = dist.max_over_ranks([read_peak(device)])[0]
    if started > budget:
        refuse(f"no way to run a meta-step fits train.memory_budget_gb={budget_gb:g}: this "
               f"process needed {started / GB:.3g} GB per process before its first step "
               f"(torch, the data, the model), whatever the plan; raise the budget, or hold "
               f"less in memory (data.mode=stream)")
    if device.type == "cpu" and cfg.train.tune_cpu_malloc:
        # One arena, so that what a probe's worker threads freed goes back to the kernel
        # between probes (measured: 86 MiB left behind by a Conv-4 probe with arenas per
        # thread, 43 with one); kept for training, whose memory the probes then measured.
        # Set at the start too (trainer.configure_cpu): threads that allocated before keep
        # their arenas, and a probe's thread may be given one, whose top is never trimmed.
        single_arena()
    plans = candidates(cfg, state.model, device, tasks["support_x"].shape[0],
                       pixels_per_task(tasks))
    code = ResidentCode() if device.type == "cpu" else None  # CPU: the budget is the RSS
    margin = probe_margin(device)
    usable = budget * (1 - margin)
    # A capped probe may refill the heap's free chunks up to the margin (capped_at), so that it
    # stays within the budget itself. One process only: another rank's messages can reach this
    # one's communication threads meanwhile, whose allocations must not fail; and only plans of
    # one task at a time in the loop: they start no worker threads (one that cannot start under
    # the cap leaves its starter waiting) and run the twin's kernels (section 16).
    alone_tuned = plans[0].malloc == "tuned" and dist.world_size == 1
    capped = (alone_tuned and all(not p.vectorize and p.in_flight == 1 for p in plans)
              and can_cap(device))
    # More intra-op threads, one process: tuned plans of one task at a time checked capped on
    # one thread (Prober.checked), where they would otherwise not be risked.
    checks = alone_tuned and not capped and capping_works(device)
    # tcmalloc, one process on one intra-op thread: every probe but the lightest stopped at the
    # budget (anchored_search). Not checked on one thread of several: with the lightest probe's
    # code resident the checks ran 20-30 MB heavier than the run on two, and took Conv-4 at the
    # peers' peak to blocks (docs/benchmarks/2026-12-05-memory-plan.md, section 30).
    tcmalloc = device.type == "cpu" and preloaded_tcmalloc()
    guarded = tcmalloc and dist.world_size == 1 and can_cap(device)
    prober = Prober(state, tasks, cfg, precision, dist,
                    cap=(usable, budget - usable) if capped or checks or guarded else None,
                    code=code)
    if tcmalloc:
        chosen, probes = anchored_search(plans, prober, usable, capped=guarded)
    else:
        chosen, probes = search(plans, prober, usable, capped=capped,
                                check=prober.checked if checks else None)
    if chosen is None and capped:
        chosen = _twin_as_it_fit(probes, prober, usable, budget - usable, device)
    if chosen is None:
        if plans[0].malloc is not None:
            tune_cpu_malloc(plans[0].malloc == "tuned")
        refuse(refusal(budget_gb, probes, margin))
    if chosen.malloc is not None:
        tune_cpu_malloc(chosen.malloc == "tuned")
    gc.collect()
    # training starts from what the process holds, not the probes' heap or code
    released_code = code.release() if code is not None else 0
    release_free_memory()
    probe = next(p for p in reversed(probes) if p.plan == chosen)  # its confirmation
    tried = {p.plan for p in probes}  # the chosen plan is probed again last, to confirm it
    fit = len({p.plan for p in probes if p.peak <= usable and not p.threads})
    stopped = len({p.plan for p in probes if p.stopped})
    # the line prints the numbers run.json keeps, so the two never differ by a rounding step
    peak_gb, before_gb = round(probe.peak / GB, 4), round(probe.before / GB, 4)
    dist.print(f"memory plan: {chosen.name}; peak {peak_gb:.3g} GB of the {budget_gb:g} "
               f"GB budget per process, {before_gb:.3g} GB of it held before the step "
               f"({len(tried)} of {len(plans)} plans probed, {fit} fit"
               + (f", {stopped} stopped at the budget)" if stopped else ")"))
    record = {"budget_gb": budget_gb, "plan": chosen.as_dict(), "name": chosen.name,
              "peak_gb": peak_gb, "before_gb": before_gb,
              "peak_before_planning_gb": round(started / GB, 4),
              "measure": "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM",
              "tuned_probes_capped": capped,
              "code_released_gb": round(released_code / GB, 4),
              "probes": [p.as_dict(usable) for p in probes]}
    return chosen, record
