"""``train.memory_budget_gb`` (fsl_dist/memory_plan.py), fast tier: the choice among measured
plans, the candidates, and that every plan gives the default's meta-gradient (one at a time and
side by side: bitwise; vmap in chunks: within 1e-6) while a probe leaves the run as it was."""

import contextlib
import gc
import math
import resource
from dataclasses import replace

import pytest
import torch

from fsl_dist.config import ConfigError, load_config
from fsl_dist.cpu_malloc import heap_free_bytes, release_free_memory, tune_cpu_malloc
from fsl_dist.distributed import Distributed
from fsl_dist.learners import learner_from_config
from fsl_dist.memory_plan import (
    GB,
    Plan,
    Probe,
    Prober,
    _twin_as_it_fit,
    anchored_search,
    can_cap,
    candidates,
    capped_at,
    capping_works,
    out_of_memory,
    plan_arguments,
    probe_margin,
    refusal,
    room_for_tuned,
    search,
    status_bytes,
)
from fsl_dist.meta import InnerLoopSpec, meta_backward
from fsl_dist.meta.precision import InnerLossScaler
from fsl_dist.models import build_model
from fsl_dist.trainer import TrainState

from launching import ROOT
from meta_helpers import flat, make_tasks, rel_err


def config(*overrides):
    return load_config(ROOT / "configs" / "cnn_maml.yaml", list(overrides))


# ---------------------------------------------------------------- the choice

DEFAULT = Plan(False, 2, "none", "tuned")
TWIN = Plan(False, 2, "none", "defaults")  # the default's arithmetic, glibc's allocator
TUNED_OTHER = Plan(False, 1, "steps", "tuned")
OTHER_TWIN = Plan(False, 1, "steps", "defaults")  # TUNED_OTHER's arithmetic, glibc's allocator
MIDDLE_FAST = Plan(False, 2, "steps", "defaults")
MIDDLE_SLOW = Plan(False, 1, "none", "defaults")
LIGHTEST = Plan(False, 1, "blocks", "defaults")
PLANS = [DEFAULT, TUNED_OTHER, TWIN, MIDDLE_FAST, MIDDLE_SLOW, LIGHTEST]


def measured(table):
    """A ``measure`` that reads (peak GB, seconds) per plan from ``table``, and a log of the
    rounds it was asked for."""
    rounds = []

    def measure(plans, capped=False):
        rounds.append(list(plans))
        return [Probe(p, table[p][0] * GB, table[p][1]) for p in plans]
    return measure, rounds


def test_a_default_that_fits_is_taken_after_its_glibc_twin_and_nothing_else_is_probed():
    measure, rounds = measured({TWIN: (0.3, 1.1), DEFAULT: (1.0, 1.0)})
    chosen, probes = search(PLANS, measure, 1.0 * GB)
    assert chosen == DEFAULT and rounds == [[TWIN], [DEFAULT]] and len(probes) == 2


def test_when_only_the_twin_fits_the_twin_is_taken_once_it_fits_again():
    measure, rounds = measured({TWIN: (0.3, 1.1), DEFAULT: (1.2, 1.0)})
    chosen, _ = search(PLANS, measure, 1.0 * GB)
    assert chosen == TWIN and rounds == [[TWIN], [DEFAULT], [TWIN]]


def test_a_twin_with_no_room_for_the_tuned_default_leads_to_the_search_without_it():
    # held 0.5 GB before the step, the twin's step adds 0.3: the tuned one may add 3x that
    twin = Probe(TWIN, 0.8 * GB, 1.1, before=0.5 * GB)
    assert not room_for_tuned(twin, 1.0 * GB) and room_for_tuned(twin, 1.4 * GB)
    # TUNED_OTHER's own twin adds 0.1 GB to the 0.5 held: room for the tuned one
    table = {TUNED_OTHER: (0.9, 0.6), OTHER_TWIN: (0.6, 1.2), MIDDLE_FAST: (0.85, 1.5),
             MIDDLE_SLOW: (0.7, 2.5), LIGHTEST: (0.6, 4.0)}
    rounds = []

    def measure(plans, capped=False):
        rounds.append(list(plans))
        return [twin if p == TWIN else Probe(p, table[p][0] * GB, table[p][1], before=0.5 * GB)
                for p in plans]
    plans = PLANS[:-1] + [OTHER_TWIN, LIGHTEST]
    chosen, probes = search(plans, measure, 1.0 * GB)
    # a lighter tuned plan beats the twin, probed after its own twin (last: its probe confirms
    # it); the tuned default is never probed, nor the lightest first (a plan has fit already)
    assert chosen == TUNED_OTHER and DEFAULT not in {p.plan for p in probes}
    # level by level: MIDDLE_FAST, OTHER_TWIN and LIGHTEST are finer than a plan of their path
    # that fit (TWIN, MIDDLE_SLOW), so OTHER_TWIN is probed only as TUNED_OTHER's twin
    assert rounds == [[TWIN], [MIDDLE_SLOW], [OTHER_TWIN], [TUNED_OTHER]]
    # its own twin without room (adds 0.2 of 0.5 left): the tuned plan is not probed either
    table[OTHER_TWIN] = (0.7, 1.2)
    rounds.clear()
    assert search(plans, measure, 1.0 * GB)[0] == TWIN
    assert TUNED_OTHER not in {plan for round_ in rounds for plan in round_}
    # nothing else fits: the twin, probed again last
    table = {p: (1.5, 0.5) for p in table}
    rounds.clear()
    assert search(PLANS, measure, 1.0 * GB)[0] == TWIN and rounds[-1] == [TWIN]


def test_the_room_for_the_tuned_default_leaves_out_what_the_first_step_keeps_resident():
    # the twin was the process's first step: 0.1 GB of library code stayed resident after it,
    # which the tuned step will not load again; its own growth is 0.2, 3x that is 0.6
    twin = Probe(TWIN, 0.8 * GB, 1.1, before=0.5 * GB, after=0.6 * GB)
    assert twin.growth == pytest.approx(0.2 * GB)
    assert room_for_tuned(twin, 1.2 * GB) and not room_for_tuned(twin, 1.19 * GB)
    # a step after which the process holds less than before: the growth is above before
    assert Probe(TWIN, 0.8 * GB, 1.1, before=0.5 * GB, after=0.4 * GB).growth == \
        pytest.approx(0.3 * GB)


def test_a_twin_that_does_not_fit_keeps_every_tuned_plan_from_being_probed():
    # a tuned probe raises every later peak, so it is not risked when memory is short
    table = {TWIN: (3.0, 1.0), MIDDLE_FAST: (1.9, 1.5), MIDDLE_SLOW: (1.5, 2.5),
             LIGHTEST: (1.0, 4.0)}
    measure, rounds = measured(table)
    chosen, probes = search(PLANS, measure, 2.0 * GB)
    assert chosen == MIDDLE_FAST
    # the chosen plan's probe is the last (training starts from the heap the probes left): a
    # round per level, and MIDDLE_FAST, probed last, is not probed again
    assert rounds == [[TWIN], [LIGHTEST], [MIDDLE_SLOW], [MIDDLE_FAST]]
    assert not any(p.plan.malloc == "tuned" for p in probes)
    # the fastest no longer fits: the next fastest that does
    chosen, _ = search(PLANS, measured(table)[0], 1.6 * GB)
    assert chosen == MIDDLE_SLOW


def test_a_plan_that_no_longer_fits_when_probed_again_gives_way_to_the_next():
    table = {TWIN: (3.0, 1.0), MIDDLE_FAST: (1.9, 1.5), MIDDLE_SLOW: (1.5, 1.2),
             LIGHTEST: (1.0, 4.0)}
    first = {}

    # MIDDLE_SLOW, the fastest here, needs more the second time (what later probes left)
    def measure(plans, capped=False):
        out = []
        for p in plans:
            peak, seconds = table[p]
            if p == MIDDLE_SLOW and first.setdefault(p, 0):
                peak = 2.1
            first[p] = 1
            out.append(Probe(p, peak * GB, seconds))
        return out
    chosen, probes = search(PLANS, measure, 2.0 * GB)
    assert chosen == MIDDLE_FAST and [p.plan for p in probes[-2:]] == [MIDDLE_SLOW, MIDDLE_FAST]


def test_a_twin_that_fits_no_more_after_the_tuned_probe_leads_to_the_search():
    table = {TWIN: (0.3, 1.0), DEFAULT: (1.2, 0.9), MIDDLE_FAST: (0.8, 1.5),
             MIDDLE_SLOW: (0.7, 2.5), LIGHTEST: (0.6, 4.0)}
    seen = set()

    def measure(plans, capped=False):  # the twin needs more after the tuned default's probe
        out = [Probe(p, (1.1 if p == TWIN and DEFAULT in seen else table[p][0]) * GB,
                     table[p][1]) for p in plans]
        seen.update(plans)
        return out
    chosen, probes = search(PLANS, measure, 1.0 * GB)
    assert chosen == MIDDLE_FAST and TUNED_OTHER not in {p.plan for p in probes}


def test_equal_times_go_to_the_plan_expected_faster():
    table = {TWIN: (3.0, 1.0), MIDDLE_FAST: (1.0, 2.0), MIDDLE_SLOW: (1.0, 2.0),
             LIGHTEST: (1.0, 2.0)}
    assert search(PLANS, measured(table)[0], 2.0 * GB)[0] == MIDDLE_FAST


def test_without_the_tuned_allocator_the_default_is_probed_alone_first():
    plans = [TWIN, MIDDLE_FAST, LIGHTEST]  # train.tune_cpu_malloc=false, or a GPU (None)
    measure, rounds = measured({TWIN: (1.0, 1.0)})
    assert search(plans, measure, 1.0 * GB)[0] == TWIN and rounds == [[TWIN]]


# tcmalloc (train.cpu_allocator): the allocator is fixed; probes capped only with a check
TWO, ONE = Plan(False, 2, "none"), Plan(False, 1, "none")
TWO_STEPS, ONE_STEPS, ONE_BLOCKS = Plan(False, 2, "steps"), Plan(False, 1, "steps"), \
    Plan(False, 1, "blocks")
FIXED = [TWO, ONE, TWO_STEPS, ONE_STEPS, ONE_BLOCKS]  # candidates' order


def test_under_tcmalloc_more_tasks_in_flight_are_probed_only_with_room_for_their_growth():
    measure, rounds = measured({ONE: (0.4, 2.0), TWO: (0.75, 1.5)})
    assert anchored_search(FIXED, measure, 1.0 * GB)[0] == TWO  # 2 x 0.4 fits: risked, faster
    assert rounds == [[ONE], [TWO]]
    measure, rounds = measured({ONE: (0.6, 2.0)})
    assert anchored_search(FIXED, measure, 1.0 * GB)[0] == ONE  # 2 x 0.6 would not: not risked
    assert rounds == [[ONE]]


def test_under_tcmalloc_the_growth_is_counted_above_what_the_process_holds():
    def measure(plans, capped=False):
        rounds.append(list(plans))
        return [Probe(p, 0.9 * GB, 1.0, before=0.5 * GB, after=0.6 * GB) for p in plans]
    rounds = []
    assert anchored_search(FIXED, measure, 1.0 * GB)[0] == ONE
    assert rounds == [[ONE]]  # 0.6 held + 2 x 0.3 growth > 1.0


def test_under_tcmalloc_a_one_task_plan_that_does_not_fit_leads_to_finer_levels_in_turn():
    measure, rounds = measured({ONE: (1.5, 1.0), ONE_STEPS: (1.2, 1.2), ONE_BLOCKS: (0.9, 1.5)})
    assert anchored_search(FIXED, measure, 1.0 * GB)[0] == ONE_BLOCKS
    assert rounds == [[ONE], [ONE_STEPS], [ONE_BLOCKS]]  # nothing of 2 tasks risked
    measure, rounds = measured({ONE: (1.5, 1.0), ONE_STEPS: (1.2, 1.2), ONE_BLOCKS: (1.1, 1.5)})
    chosen, probes = anchored_search(FIXED, measure, 1.0 * GB)
    assert chosen is None and "needs 1.1 GB" in refusal(1.0, probes)


def capped_measured(table):
    """``measured``, with each round's ``capped`` logged and a capped peak past the budget
    (1 GB) read as stopped there (inf)."""
    rounds = []

    def measure(plans, capped=False):
        rounds.append((list(plans), capped))
        peaks = [table[p][0] * GB for p in plans]
        return [Probe(p, math.inf if capped and peak > GB else peak, table[p][1])
                for p, peak in zip(plans, peaks)]
    return measure, rounds


def test_under_tcmalloc_capped_the_lightest_plan_goes_first_and_the_rest_are_stopped():
    # One thread, one process: the finest level first, uncapped; the heavy anchor and steps
    # capped (stopped at the budget), never run past it.
    measure, rounds = capped_measured({ONE: (3.0, 1.0), ONE_STEPS: (1.2, 1.2),
                                       ONE_BLOCKS: (0.9, 1.5)})
    chosen, probes = anchored_search(FIXED, measure, 1.0 * GB, capped=True)
    assert chosen == ONE_BLOCKS
    assert rounds == [([ONE_BLOCKS], False), ([ONE], True), ([ONE_STEPS], True),
                      ([ONE_BLOCKS], True)]  # the last: its confirmation
    assert all(p.peak <= GB or p.peak == math.inf for p in probes)


def test_under_tcmalloc_capped_an_anchor_that_fits_still_widens_by_its_growth():
    measure, rounds = capped_measured({ONE_BLOCKS: (0.3, 3.0), ONE: (0.4, 2.0), TWO: (0.75, 1.5)})
    chosen, _ = anchored_search(FIXED, measure, 1.0 * GB, capped=True)
    assert chosen == TWO
    assert rounds == [([ONE_BLOCKS], False), ([ONE], True), ([TWO], False)]


def test_under_tcmalloc_capped_nothing_is_risked_when_the_lightest_does_not_fit():
    measure, rounds = capped_measured({ONE_BLOCKS: (1.3, 3.0)})
    chosen, probes = anchored_search(FIXED, measure, 1.0 * GB, capped=True)
    assert chosen is None and rounds == [([ONE_BLOCKS], False)]
    assert "needs 1.3 GB" in refusal(1.0, probes)


def test_nothing_fits_after_two_probes_and_the_refusal_names_the_smallest_need():
    table = {TWIN: (3.0, 1.0), LIGHTEST: (1.25, 4.0)}
    measure, rounds = measured(table)
    chosen, probes = search(PLANS, measure, 1.0 * GB)
    assert chosen is None and rounds == [[TWIN], [LIGHTEST]]
    line = refusal(1.0, probes)
    assert line.startswith("no way to run a meta-step fits train.memory_budget_gb=1: the "
                           f"smallest plan ({LIGHTEST.name}) needs 1.25 GB per process")
    assert "raise the budget" in line and "\n" not in line


def test_the_refusal_names_each_plan_by_what_its_latest_probe_needed():
    # MIDDLE_FAST fit at first (0.9 GB), then failed its confirmation (1.1 GB): that is its need
    probes = [Probe(MIDDLE_FAST, 0.9 * GB, 1.0), Probe(LIGHTEST, 1.25 * GB, 4.0),
              Probe(MIDDLE_FAST, 1.1 * GB, 1.0)]
    assert f"({MIDDLE_FAST.name}) needs 1.1 GB per process" in refusal(1.0, probes)
    # equal needs: the plan probed later
    tie = [Probe(MIDDLE_SLOW, 1.2 * GB, 1.0), Probe(LIGHTEST, 1.2 * GB, 4.0)]
    assert f"({LIGHTEST.name}) needs 1.2 GB" in refusal(1.0, tie)


# Where the tuned default's probe is capped at the budget (capped_at), the twin's room is not
# needed to risk it: a probe that would go past the budget is stopped (peak inf).
STOPPED = math.inf


def test_capped_the_tuned_default_is_probed_after_any_twin_that_fits_and_only_it_capped():
    twin = Probe(TWIN, 0.8 * GB, 1.1, before=0.5 * GB)  # no room for 3x its growth in 1 GB
    rounds = []

    def measure(plans, capped=False):
        rounds.append((list(plans), capped))
        return [twin if p == TWIN else Probe(p, 0.95 * GB, 0.9) for p in plans]
    chosen, probes = search(PLANS, measure, 1.0 * GB, capped=True)
    assert chosen == DEFAULT and rounds == [([TWIN], False), ([DEFAULT], True)]


def test_capped_a_stopped_tuned_default_leads_to_the_search_with_the_twin_in_it():
    table = {TWIN: (0.8, 1.1), DEFAULT: (STOPPED, 0.0), TUNED_OTHER: (0.9, 0.7),
             MIDDLE_FAST: (0.85, 1.5), MIDDLE_SLOW: (0.7, 2.5), LIGHTEST: (0.6, 4.0)}
    measure, rounds = measured(table)
    chosen, probes = search(PLANS, measure, 1.0 * GB, capped=True)
    assert chosen == TUNED_OTHER
    # level by level; MIDDLE_FAST and LIGHTEST are finer than TWIN and MIDDLE_SLOW, which fit;
    # TUNED_OTHER, probed last, needs no confirmation
    assert rounds == [[TWIN], [DEFAULT], [MIDDLE_SLOW], [TUNED_OTHER]]
    table[TUNED_OTHER] = (1.1, 0.7)  # then the twin, the fastest left, confirmed
    chosen, probes = search(PLANS, measured(table)[0], 1.0 * GB, capped=True)
    assert chosen == TWIN and probes[-1].plan == TWIN


def test_capped_a_tuned_default_that_ran_past_the_budget_gives_way_to_its_twin():
    # not stopped (its heap's free chunks refilled) but over: as uncapped, the twin again
    measure, rounds = measured({TWIN: (0.3, 1.1), DEFAULT: (1.01, 1.0)})
    assert search(PLANS, measure, 1.0 * GB, capped=True)[0] == TWIN
    assert rounds == [[TWIN], [DEFAULT], [TWIN]]


def test_capped_a_twin_that_does_not_fit_still_keeps_tuned_plans_out():
    table = {TWIN: (3.0, 1.0), MIDDLE_FAST: (1.9, 1.5), MIDDLE_SLOW: (1.5, 2.5),
             LIGHTEST: (1.0, 4.0)}
    measure, rounds = measured(table)
    chosen, probes = search(PLANS, measure, 2.0 * GB, capped=True)
    assert chosen == MIDDLE_FAST and not any(p.plan.malloc == "tuned" for p in probes)


def test_a_refusal_where_every_plan_was_stopped_says_so_instead_of_a_need():
    line = refusal(1.0, [Probe(TUNED_OTHER, STOPPED, 0.0, before=0.5 * GB),
                         Probe(LIGHTEST, STOPPED, 0.0, before=0.5 * GB)])
    assert (f"({LIGHTEST.name}) needs more than the budget (its probe step was stopped at it) "
            f"(0.5 GB held before the step" in line and "inf" not in line)


def test_capped_every_round_after_the_twin_is_capped():
    table = {TWIN: (0.8, 1.1), DEFAULT: (STOPPED, 0.0), TUNED_OTHER: (0.9, 0.7),
             MIDDLE_FAST: (0.85, 1.5), MIDDLE_SLOW: (0.7, 2.5), LIGHTEST: (0.6, 4.0)}
    capped_rounds = []

    def measure(plans, capped=False):
        capped_rounds.append(capped)
        return [Probe(p, table[p][0] * GB, table[p][1]) for p in plans]
    assert search(PLANS, measure, 1.0 * GB, capped=True)[0] == TUNED_OTHER
    assert capped_rounds == [False, True, True, True]  # twin, default, a round per level
    capped_rounds.clear()
    assert search(PLANS, measure, 1.0 * GB)[0] == TWIN  # uncapped: TUNED_OTHER's twin unprobed
    assert not any(capped_rounds)


def test_after_a_capped_search_found_nothing_the_twin_is_probed_uncapped_in_a_heap_as_it_was():
    asked, cpu = [], torch.device("cpu")

    def prober(plans, capped=False):
        asked.append((list(plans), capped))
        return [Probe(TWIN, 0.85 * GB, 1.0)]
    # what this process holds, as the twin's next step starts (after the same hand-back of free
    # heap the fallback does first: a test before this one may have left 100 MB of it)
    gc.collect()
    release_free_memory()
    held = status_bytes("VmRSS")
    stopped = Probe(TWIN, STOPPED, 0.0)
    # its first step grew the process by 0.2 GB, in a heap no fuller than now
    as_it_was = [Probe(TWIN, 0.3 * GB, 1.0, before=0.05 * GB, after=0.1 * GB,
                       heap_free=100 * GB), stopped]
    assert _twin_as_it_fit(list(as_it_was), prober, held + 0.3 * GB, 0.0, cpu) == TWIN
    assert asked == [([TWIN], False)]
    asked.clear()
    assert _twin_as_it_fit(list(as_it_was), prober, held + 0.1 * GB, 0.0, cpu) is None
    fuller = [replace(as_it_was[0], heap_free=0.0), stopped]  # free chunks since
    assert _twin_as_it_fit(fuller, prober, held + 0.3 * GB, 0.0, cpu) is None
    assert _twin_as_it_fit(as_it_was[:1], prober, held + 0.3 * GB, 0.0, cpu) is None
    assert asked == []  # not probed: it would not fit, or the heap is fuller, or none stopped


def test_a_stopped_probe_records_no_peak_and_is_never_the_smallest_need():
    stopped = Probe(TUNED_OTHER, STOPPED, 0.0, before=0.5 * GB)
    record = stopped.as_dict(1.0 * GB)
    assert record["peak_gb"] is None and record["seconds"] is None
    assert record["stopped_at_budget"] and not record["fits"]
    line = refusal(1.0, [stopped, Probe(LIGHTEST, 1.25 * GB, 4.0)])
    assert f"({LIGHTEST.name}) needs 1.25 GB" in line


def checked_on_one_thread(table):
    """A ``check`` as Prober.checked's: (peak GB, seconds) of the one-thread check, then of the
    run on all threads when the check fit; and a log of the plans checked with their twins."""
    asked = []

    def check(plan, twin):
        asked.append((plan, twin.plan))
        on_one, on_all = table[plan]
        probes = [Probe(plan, on_one * GB, 9.9, threads=1)]
        return probes + ([Probe(plan, on_all[0] * GB, on_all[1])] if on_one <= 1.0 else [])
    return check, asked


def test_with_more_threads_a_tuned_plan_one_at_a_time_is_checked_where_memory_is_short():
    # the twin misses: uncapped, no tuned plan would be risked; checked, one fits on one thread
    table = {TWIN: (1.2, 1.0), OTHER_TWIN: (0.8, 1.2), MIDDLE_FAST: (1.1, 1.5),
             MIDDLE_SLOW: (0.7, 2.5), LIGHTEST: (0.6, 4.0)}
    measure, rounds = measured(table)
    check, asked = checked_on_one_thread({TUNED_OTHER: (0.9, (0.95, 0.6))})
    plans = PLANS[:-1] + [OTHER_TWIN, LIGHTEST]
    chosen, probes = search(plans, measure, 1.0 * GB, check=check)
    assert chosen == TUNED_OTHER and asked == [(TUNED_OTHER, OTHER_TWIN)]
    assert rounds == [[TWIN], [LIGHTEST], [MIDDLE_SLOW], [MIDDLE_FAST], [OTHER_TWIN]]
    # its time is the run on all threads (9.9 s on one would lose to the others)
    assert probes[-1].plan == TUNED_OTHER and not probes[-1].threads
    # stopped on one thread: never run on all, nor taken; the check is not its measure
    check, asked = checked_on_one_thread({TUNED_OTHER: (STOPPED, None)})
    chosen, probes = search(plans, measured(table)[0], 1.0 * GB, check=check)
    assert chosen == OTHER_TWIN and [p.threads for p in probes if p.plan == TUNED_OTHER] == [1]
    # fit on one thread, over the budget on all: not taken either
    check, _ = checked_on_one_thread({TUNED_OTHER: (0.9, (1.05, 0.6))})
    assert search(plans, measured(table)[0], 1.0 * GB, check=check)[0] == OTHER_TWIN
    # a twin that does not fit: the tuned plan is not checked
    table[OTHER_TWIN] = (1.1, 1.2)
    check, asked = checked_on_one_thread({TUNED_OTHER: (0.9, (0.95, 0.6))})
    assert search(plans, measured(table)[0], 1.0 * GB, check=check)[0] == MIDDLE_SLOW
    assert asked == []


def test_checks_end_at_the_first_tuned_plan_that_fits_on_all_threads():
    # finer levels after it are expected slower, and a stopped check can pin free heap chunks
    none, steps = Plan(False, 1, "none", "tuned"), TUNED_OTHER
    none_twin = Plan(False, 1, "none", "defaults")
    plans = [DEFAULT, none, steps, TWIN, none_twin, OTHER_TWIN, LIGHTEST]
    table = {TWIN: (1.2, 1.0), none_twin: (0.7, 2.0), OTHER_TWIN: (0.7, 2.2), LIGHTEST: (0.6, 4.0)}
    check, asked = checked_on_one_thread({none: (0.9, (0.95, 0.5)), steps: (0.8, (0.85, 0.6))})
    chosen, _ = search(plans, measured(table)[0], 1.0 * GB, check=check)
    assert chosen == none and asked == [(none, none_twin)]
    # stopped on one thread: the next level is checked
    check, asked = checked_on_one_thread({none: (STOPPED, None), steps: (0.8, (0.85, 0.6))})
    chosen, _ = search(plans, measured(table)[0], 1.0 * GB, check=check)
    assert chosen == steps and asked == [(none, none_twin), (steps, OTHER_TWIN)]


def test_no_finer_level_is_probed_where_a_coarser_one_of_its_path_fit():
    # the shape of the two-thread Conv-4 meta-batch-32 row (log, sections 20 and 23): the twin
    # fits without room for the tuned default; one at a time fits, and its tuned plan's check
    plans = [Plan(False, n, level, malloc) for malloc in ("tuned", "defaults")
             for level in ("none", "steps", "blocks") for n in (2, 1)]
    one_tuned, one_twin = Plan(False, 1, "none", "tuned"), Plan(False, 1, "none", "defaults")
    rounds = []

    def measure(plans, capped=False):
        rounds.append(list(plans))
        return [Probe(p, 0.99 * GB if p.in_flight == 2 else 0.95 * GB, 2.0 * p.in_flight,
                      before=0.9 * GB) for p in plans]
    check, asked = checked_on_one_thread({one_tuned: (0.97, (0.98, 1.5))})
    chosen, probes = search(plans, measure, 1.0 * GB, check=check)
    assert chosen == one_tuned and asked == [(one_tuned, one_twin)]
    assert rounds == [[TWIN], [one_twin]]  # no steps or blocks plan, of either allocator
    # the tuned plan one at a time stopped: the next level's tuned plan is wanted, and its
    # twin, left out as finer than a plan that fit, is probed for it first
    steps_tuned = replace(one_tuned, checkpoint="steps")
    check, asked = checked_on_one_thread({one_tuned: (STOPPED, None),
                                          steps_tuned: (0.97, (0.98, 1.7))})
    rounds.clear()
    chosen, _ = search(plans, measure, 1.0 * GB, check=check)
    assert chosen == steps_tuned
    assert rounds == [[TWIN], [one_twin], [Plan(False, 2, "steps", "defaults"),
                                           replace(one_twin, checkpoint="steps")]]


def test_with_more_threads_a_tuned_default_one_at_a_time_is_checked_after_a_twin_without_room():
    default, twin = Plan(False, 1, "none", "tuned"), Plan(False, 1, "none", "defaults")
    lightest = Plan(False, 1, "steps", "defaults")
    plans = [default, Plan(False, 1, "steps", "tuned"), twin, lightest]
    twin_probe = Probe(twin, 0.8 * GB, 1.1, before=0.5 * GB)  # no room for 3x its growth
    rounds = []

    def measure(plans, capped=False):
        rounds.append(list(plans))
        return [twin_probe if p == twin else Probe(p, 0.7 * GB, 2.0) for p in plans]
    check, asked = checked_on_one_thread({default: (0.9, (0.95, 0.9))})
    chosen, probes = search(plans, measure, 1.0 * GB, check=check)
    assert chosen == default and rounds == [[twin]] and asked == [(default, twin)]
    # a process with more threads and no check (several processes): the search without it
    rounds.clear()
    chosen, probes = search(plans, measure, 1.0 * GB)
    assert default not in {p.plan for p in probes}


MiB = 2**20


@contextlib.contextmanager
def cappable_on(threads: int):
    """``threads`` intra-op threads, in a process where ``capped_at`` works (on one thread);
    skips where it does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if not capping_works(torch.device("cpu")):
            pytest.skip("needs Linux >= 4.7 and glibc >= 2.33 (RLIMIT_DATA, mallinfo2) with "
                        "the allocator fsl_dist's to set")
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread, where probes can be capped (can_cap)."""
    with cappable_on(1):
        yield


@pytest.fixture
def two_threads():
    """Two, where a probe can be capped on one thread only (Prober.checked)."""
    with cappable_on(2):
        yield


def test_probes_are_capped_on_one_intra_op_thread_only(one_thread):
    assert can_cap(torch.device("cpu"))
    torch.set_num_threads(2)  # a refused allocation in an OpenMP team's thread may abort
    assert not can_cap(torch.device("cpu"))


def test_capped_at_refuses_an_allocation_past_the_budget_and_then_lifts_the_cap(one_thread):
    limit_before = resource.getrlimit(resource.RLIMIT_DATA)
    budget = status_bytes("VmRSS") + heap_free_bytes() + 64 * MiB  # 64 MiB of room
    try:
        with capped_at(budget, slack=0.0):
            within = torch.ones(32 * MiB // 4)  # its own mapping (over glibc's threshold)
            with pytest.raises(RuntimeError) as refused:
                torch.ones(256 * MiB // 4)
            assert out_of_memory(refused.value)
            del within
        assert resource.getrlimit(resource.RLIMIT_DATA) == limit_before
        assert torch.ones(256 * MiB // 4).sum() == 256 * MiB // 4  # no cap any more
    finally:
        tune_cpu_malloc(False)  # capped_at leaves the tuned settings on; this process: glibc's
    assert not out_of_memory(RuntimeError("shape mismatch")) and out_of_memory(MemoryError())


def test_an_uncapped_probe_out_of_memory_is_stopped_and_any_other_error_raised(monkeypatch):
    """Uncapped (a GPU, several threads), a plan that needs more than the device or machine
    has is stopped as one over the budget, not the end of the run; a bug still raises."""
    cfg = config("algorithm.inner_steps=1", "model.width=8")
    model = build_model("cnn", cfg.task.n_way, width=8)
    tasks = make_tasks(tasks=1, n_way=cfg.task.n_way, n_query=2, size=28, dtype=torch.float32)
    state = TrainState(model, learner_from_config(cfg, model),
                       torch.optim.Adam(model.parameters()), InnerLossScaler(), InnerLossScaler())
    real = state.learner.meta_backward

    def short_of_memory(*args, **kwargs):
        real(*args, **kwargs)  # the gradients are there when memory runs out
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(state.learner, "meta_backward", short_of_memory)
    prober = Prober(state, tasks, cfg, "no", Distributed(), repeats=1)
    (stopped,) = prober([Plan(False, 1, "none", None)])
    assert stopped.stopped and all(p.grad is None for p in model.parameters())

    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(state.learner, "meta_backward", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        prober([Plan(False, 1, "none", None)])


def test_a_capped_probe_is_stopped_and_leaves_the_run_as_it_was(one_thread):
    """With no room at all, a capped probe is stopped, and the process goes on as it was."""
    cfg = config("algorithm.inner_steps=1", "model.width=32")
    torch.manual_seed(0)
    model = build_model("cnn", cfg.task.n_way, width=32)
    # 600 query images: an activation of the first block (60 MB) is a mapping of its own, which
    # the cap refuses however many free chunks the heap of this test process holds
    tasks = make_tasks(tasks=1, n_way=cfg.task.n_way, n_query=120, size=28,
                       dtype=torch.float32)
    state = TrainState(model, learner_from_config(cfg, model),
                       torch.optim.Adam(model.parameters()), InnerLossScaler(), InnerLossScaler())
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    rng, limit_before = torch.get_rng_state(), resource.getrlimit(resource.RLIMIT_DATA)
    budget = status_bytes("VmRSS") - GB  # no room at all
    try:
        prober = Prober(state, tasks, cfg, "no", Distributed(), repeats=1, cap=(budget, 0.0))
        # the twin first, uncapped: the kernels are made (one made under the cap could break)
        twin, uncapped = prober([Plan(False, 1, "none", "defaults"),
                                 Plan(False, 1, "none", "tuned")])
        tuned, defaults = prober([Plan(False, 1, "none", "tuned"),
                                  Plan(False, 1, "none", "defaults")], capped=True)
    finally:
        tune_cpu_malloc(False)
    assert not twin.stopped and not uncapped.stopped  # only a capped round is capped
    assert tuned.stopped and not tuned.peak <= budget and tuned.before > 0
    assert defaults.stopped  # in a capped round every plan is capped
    assert resource.getrlimit(resource.RLIMIT_DATA) == limit_before
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not state.optimizer.state
    # kernels of new shapes can still be made: none was being made when the cap struck
    # (the twin made them uncapped; a oneDNN convolution kernel that fails to allocate breaks
    # every later one)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, cfg.task.n_way)


def test_with_two_threads_a_check_runs_on_one_capped_and_then_on_both_only_if_it_fit(
        two_threads):
    """Prober.checked: the twin's step on one thread first (its kernels), then the tuned plan
    capped on one thread; only a check that fit runs on the run's two threads. The caller's
    threads, the cap and the run are as before."""
    try:
        cfg = config("algorithm.inner_steps=1", "model.width=32")
        torch.manual_seed(0)
        model = build_model("cnn", cfg.task.n_way, width=32)
        tasks = make_tasks(tasks=1, n_way=cfg.task.n_way, n_query=120, size=28,
                           dtype=torch.float32)  # an activation of 60 MB: see the test above
        state = TrainState(model, learner_from_config(cfg, model),
                           torch.optim.Adam(model.parameters()), InnerLossScaler(),
                           InnerLossScaler())
        weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
        rng, limit_before = torch.get_rng_state(), resource.getrlimit(resource.RLIMIT_DATA)
        tuned, defaults = Plan(False, 1, "none", "tuned"), Plan(False, 1, "none", "defaults")
        prober = Prober(state, tasks, cfg, "no", Distributed(), repeats=1,
                        cap=(status_bytes("VmRSS") + 10 * GB, 0.0))  # room for anything
        (twin,) = prober([defaults])
        fit = prober.checked(tuned, twin)
        assert [(p.plan, p.threads) for p in fit] == [(defaults, 1), (tuned, 1), (tuned, 0)]
        assert not any(p.stopped for p in fit) and prober.more_on_all_threads >= 0
        prober.cap = (status_bytes("VmRSS") - GB, 0.0)  # no room at all
        (stopped,) = prober.checked(tuned, twin)  # the kernels for one thread: made already
        assert stopped.stopped and stopped.threads == 1
        assert torch.get_num_threads() == 2
    finally:
        tune_cpu_malloc(False)
    assert resource.getrlimit(resource.RLIMIT_DATA) == limit_before
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not state.optimizer.state
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, cfg.task.n_way)


def test_several_intra_op_threads_keep_a_wider_margin_of_the_budget_free():
    """Their step's peak spreads by tens of MB around its probe (log sections 20, 24)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert probe_margin(torch.device("cpu")) == 0.005
        torch.set_num_threads(2)
        assert probe_margin(torch.device("cpu")) == 0.02
        assert probe_margin(torch.device("cuda")) == 0.005  # the device's memory, not the heap's
    finally:
        torch.set_num_threads(threads)
    line = refusal(1.0, [Probe(Plan(False, 1, "blocks", None), 1.2 * GB, 1.0)], 0.02)
    assert "2.0% of the budget is kept free" in line


def test_the_budget_must_be_positive_or_null():
    assert config().train.memory_budget_gb is None
    assert config("train.memory_budget_gb=1.5").train.memory_budget_gb == 1.5
    with pytest.raises(ConfigError, match="memory_budget_gb"):
        config("train.memory_budget_gb=0")
    with pytest.raises(ConfigError, match="plans the MAML family's inner loop; `algorithm.name` "
                       "= protonet has none to plan"):
        config("train.memory_budget_gb=1.5", "algorithm.name=protonet")


# ---------------------------------------------------------------- the candidates


def test_cpu_candidates_start_with_the_default_and_end_with_the_lightest():
    torch.set_num_threads(2)
    model = build_model("cnn", 5, width=8)
    plans = candidates(config(), model, torch.device("cpu"), 8, 1000)
    assert plans[0] == Plan(False, 2, "none", "tuned")  # what meta_backward does unasked
    assert plans[-1] == Plan(False, 1, "blocks", "defaults")
    assert len(plans) == len(set(plans)) == 2 * 3 * 2  # workers x levels x allocator
    assert not any(p.vectorize for p in plans)  # the loop on CPU (faster and lighter)


def test_first_order_and_a_forced_vmap_narrow_the_candidates():
    model = build_model("cnn", 5, width=8)
    cpu = torch.device("cpu")
    first = candidates(config("algorithm.first_order=true"), model, cpu, 8, 1000)
    assert {p.checkpoint for p in first} == {"none"}  # no step graph to checkpoint
    vmap = candidates(config("algorithm.vectorize=true"), model, cpu, 8, 1000)
    assert {(p.vectorize, p.in_flight) for p in vmap} == {(True, n) for n in (8, 4, 2, 1)}
    assert vmap[0].in_flight == 8
    no_malloc = candidates(config("train.tune_cpu_malloc=false"), model, cpu, 8, 1000)
    assert {p.malloc for p in no_malloc} == {None}


# ---------------------------------------------------------------- the meta-gradient


def gradient(model, tasks, spec, **arguments):
    for p in model.parameters():
        p.grad = None
    stats = meta_backward(model, tasks, spec, **arguments)
    return flat([p.grad for p in model.parameters()]), stats


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("cnn", 3, width=4, blocks=2, image_size=8)
    return model, make_tasks(tasks=4, dtype=torch.float32, jitter=0.1)


def test_tasks_one_at_a_time_give_the_side_by_side_gradient(tiny):
    # Bitwise on one intra-op thread; a task alone on two threads sums its convolutions in
    # another order (within float rounding).
    model, tasks = tiny
    spec = InnerLoopSpec("maml", 2, 0.4, vectorize=False)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        side_by_side, stats = gradient(model, tasks, spec, workers=2)
        one_at_a_time, stats1 = gradient(model, tasks, spec,
                                         **plan_arguments(Plan(False, 1, "none")))
        if threads == 1:
            assert torch.equal(one_at_a_time, side_by_side)
            assert all(torch.equal(stats[k], stats1[k]) for k in stats)
        assert rel_err(one_at_a_time, side_by_side) < 1e-6


@pytest.mark.parametrize("chunk", [1, 3])
def test_vmap_in_chunks_gives_the_whole_batch_gradient(tiny, chunk):
    model, tasks = tiny
    spec = InnerLoopSpec("maml", 2, 0.4, vectorize=True)
    whole, stats = gradient(model, tasks, spec)
    chunked, chunk_stats = gradient(model, tasks, spec, **plan_arguments(Plan(True, chunk,
                                                                              "none")))
    assert rel_err(chunked, whole) < 1e-6
    for k in stats:
        torch.testing.assert_close(chunk_stats[k], stats[k], rtol=1e-6, atol=1e-7)


def test_a_probe_leaves_the_weights_the_random_state_and_the_gradients_as_they_were():
    cfg = config("algorithm.inner_steps=1", "model.width=8")
    torch.manual_seed(0)
    model = build_model("cnn", cfg.task.n_way, width=8)
    tasks = make_tasks(tasks=2, n_way=cfg.task.n_way, size=28, dtype=torch.float32)
    state = TrainState(model, learner_from_config(cfg, model),
                       torch.optim.Adam(model.parameters()), InnerLossScaler(), InnerLossScaler())
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    rng = torch.get_rng_state()
    prober = Prober(state, tasks, cfg, "no", Distributed(), repeats=1)
    probes = prober([Plan(False, 1, "none", None), Plan(False, 1, "steps", None)])
    assert all(p.peak > p.before > 0 and p.after > 0 and p.seconds > 0 for p in probes)
    assert all(0 < p.growth <= p.peak - p.before for p in probes)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not state.optimizer.state


class CountedReleases:
    """Stands in for ResidentCode: counts the hand-backs a Prober asks for."""

    def __init__(self):
        self.releases = 0

    def release(self) -> int:
        self.releases += 1
        return 0


def test_an_uncapped_probe_hands_back_earlier_probes_code_and_a_capped_one_keeps_it(one_thread):
    """Earlier probes' library pages would count in an uncapped probe's peak but not in
    training's; a capped probe keeps them, since its cap cannot see pages coming back."""
    cfg = config("algorithm.inner_steps=1", "model.width=8")
    model = build_model("cnn", cfg.task.n_way, width=8)
    tasks = make_tasks(tasks=2, n_way=cfg.task.n_way, size=28, dtype=torch.float32)
    state = TrainState(model, learner_from_config(cfg, model),
                       torch.optim.Adam(model.parameters()), InnerLossScaler(), InnerLossScaler())
    code = CountedReleases()
    prober = Prober(state, tasks, cfg, "no", Distributed(), repeats=1,
                    cap=(status_bytes("VmRSS") + 10 * GB, 0.0), code=code)  # room for anything
    try:
        prober([Plan(False, 1, "none", "defaults"), Plan(False, 1, "steps", "defaults")])
        assert code.releases == 2
        prober([Plan(False, 1, "none", "tuned")], capped=True)
        assert code.releases == 2
    finally:
        tune_cpu_malloc(False)


def test_a_probe_peaks_with_the_score_before_adaptation_and_times_the_step_without_it():
    """A logging step scores the query set before adapting (its peak must fit); most steps do
    not (their time is the plan's): the first repeat does, the timed ones do not."""
    cfg = config("algorithm.inner_steps=1", "model.width=8")
    model = build_model("cnn", cfg.task.n_way, width=8)
    tasks = make_tasks(tasks=2, n_way=cfg.task.n_way, size=28, dtype=torch.float32)
    state = TrainState(model, learner_from_config(cfg, model),
                       torch.optim.Adam(model.parameters()), InnerLossScaler(), InnerLossScaler())
    seen, original = [], state.learner.meta_backward

    def recording(*args, acc_before=True, **kwargs):
        seen.append(acc_before)
        return original(*args, acc_before=acc_before, **kwargs)

    state.learner.meta_backward = recording
    Prober(state, tasks, cfg, "no", Distributed(), repeats=3)([Plan(False, 1, "none", None)])
    assert seen == [True, False, False]


def test_the_bench_row_under_a_budget_computes_the_loop_meta_gradient(tiny):
    from fsl_dist.bench import peers
    from fsl_dist.bench.measure import meta_gradient

    model, tasks = tiny
    case = {"model": "cnn", "algorithm": "maml", "inner_steps": 2, "n_way": 3, "k_shot": 1,
            "n_query": 2, "meta_batch": 4}
    planned = peers.METHODS["loop, memory plan"][1](model, tasks, {**case, "budget_mib": 1e5})
    assert planned.plan_record["probes"][0]["fits"]
    loop = peers.METHODS["loop"][1](model, tasks, case)
    assert torch.equal(meta_gradient(planned, model), meta_gradient(loop, model))


def test_a_twin_without_room_is_the_plan_when_it_is_the_only_other_plan():
    # one thread, first order: the default and its twin are the only candidates
    twin = Probe(TWIN, 0.8 * GB, 1.1, before=0.5 * GB)
    chosen, probes = search([DEFAULT, TWIN], lambda plans: [twin], 1.0 * GB)
    assert chosen == TWIN and len(probes) == 1
