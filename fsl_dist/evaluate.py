"""Held-out evaluation: adapt on each episode's support set with the learned inner loop, score the
query set, and report the mean accuracy with a 95% confidence interval.

Episode i of an evaluation is a pure function of (eval seed, i), so every run, every process
count and every resume meets the same episodes. Episodes are divided among processes in
contiguous slices and the per-episode accuracies gathered back in order.
"""

from __future__ import annotations

import math

import torch

from fsl_dist.meta import InnerLoopSpec, evaluate_tasks


def split_episodes(episodes: int, rank: int, world: int) -> range:
    """Contiguous share of `episodes` for `rank`; shares differ by at most one episode."""
    base, extra = divmod(episodes, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def confidence_interval(accuracies: torch.Tensor) -> dict:
    """Mean and 95% half-width, 1.96 * sample std / sqrt(episodes), in percent."""
    acc = accuracies.double() * 100.0
    n = acc.numel()
    std = acc.std(unbiased=True).item() if n > 1 else float("nan")
    return {"mean": acc.mean().item(), "ci95": 1.96 * std / math.sqrt(n), "std": std, "episodes": n}


def evaluate(model, spec: InnerLoopSpec, episode_source, *, episodes: int, dist,
             batch_size: int) -> dict:
    """Mean query accuracy after adaptation (and before it) over `episodes` held-out episodes."""
    mine = split_episodes(episodes, dist.rank, dist.world_size)
    after, before = [], []
    for start in range(mine.start, mine.stop, batch_size):
        chunk = range(start, min(start + batch_size, mine.stop))
        tasks = {k: v.to(dist.device) for k, v in episode_source.batch(0, chunk).items()}
        stats = evaluate_tasks(model, tasks, spec)
        after.append(stats["acc_after_per_task"].detach().cpu())
        # the mean before adaptation is all that is reported of it: one value per episode
        before.append(stats["acc_before"].detach().cpu().expand(len(chunk)))
    empty = torch.zeros(0)
    acc_after = dist.gather_ragged(torch.cat(after) if after else empty)
    acc_before = dist.gather_ragged(torch.cat(before) if before else empty)
    result = confidence_interval(acc_after)
    result["before_adaptation"] = confidence_interval(acc_before)["mean"]
    return result
