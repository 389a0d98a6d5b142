"""Held-out evaluation: adapt on each episode's support set with the learned inner loop, score the
query set, and report the mean accuracy with a 95% confidence interval.

Episode i of an evaluation is a pure function of (eval seed, i), so every run, every process
count and every resume meets the same episodes. Episodes are divided among processes in
contiguous slices and the per-episode accuracies gathered back in order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fsl_dist.progress import progress


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


# Two-sided 95% quantiles of Student's t for 1-30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(dof: int) -> float:
    """Student's t 97.5% quantile: the table to 30 degrees of freedom, then its expansion in
    1/dof around the normal 1.96 (within 1e-3 of the exact value beyond 30)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def combine_seeds(per_seed: list[dict]) -> dict:
    """One result from evaluations with different episode seeds (``confidence_interval``'s
    dicts plus ``eval_seed``).

    The episode interval of one seed assumes independent episodes; evaluations of one model
    with other seeds have spread further than it implies. So the seeds' means are also taken
    as independent measurements: ``ci95_seeds`` is the t interval of their mean,
    ``ci95_episodes`` the interval over all episodes pooled, and ``ci95`` the larger (the
    interval the row's claims are judged by; its ``low`` end is ``mean - ci95``)."""
    if len(per_seed) < 2:
        raise ValueError("combine_seeds needs at least two seeds")
    means = torch.tensor([r["mean"] for r in per_seed], dtype=torch.float64)
    episodes = [r["episodes"] for r in per_seed]
    # pooled variance of all episodes: within-seed sums of squares plus the spread of the means
    within = sum((n - 1) * r["std"] ** 2 for n, r in zip(episodes, per_seed))
    weights = torch.tensor(episodes, dtype=torch.float64)
    mean = float((means * weights).sum() / weights.sum())
    between = float((weights * (means - mean) ** 2).sum())
    total = int(weights.sum())
    pooled_std = math.sqrt((within + between) / (total - 1))
    seed_std = float(means.std(unbiased=True))
    ci95_seeds = t_quantile_975(len(per_seed) - 1) * seed_std / math.sqrt(len(per_seed))
    ci95_episodes = 1.96 * pooled_std / math.sqrt(total)
    ci95 = max(ci95_seeds, ci95_episodes)
    return {"mean": mean, "ci95": ci95, "low": mean - ci95, "episodes": total,
            "seeds": [r["eval_seed"] for r in per_seed], "seed_means": means.tolist(),
            "seed_std": seed_std, "seed_range": float(means.max() - means.min()),
            "ci95_seeds": ci95_seeds, "ci95_episodes": ci95_episodes, "per_seed": per_seed}


def evaluate(learner, episode_source, *, episodes: int, dist, precision: str, batch_size: int,
             inner_steps: Optional[int] = None, quiet: bool = False,
             desc: str = "evaluating") -> dict:
    """Mean query accuracy after adaptation (and before it) over `episodes` held-out episodes,
    adapted and scored by ``learner`` (fsl_dist/learners; ``inner_steps`` overrides its own):
    ``evaluate_episodes`` with the learner's ``evaluate_tasks``."""
    def score(tasks: dict, _episodes: range) -> dict:
        stats = learner.evaluate_tasks(tasks, precision=precision, inner_steps=inner_steps)
        return {"acc": stats["acc_after_per_task"], "acc_before": stats["acc_before"]}

    return evaluate_episodes(score, episode_source, episodes=episodes, dist=dist,
                             batch_size=batch_size, quiet=quiet, desc=desc, with_before=True)


def evaluate_episodes(score, episode_source, *, episodes: int, dist, batch_size: int,
                      quiet: bool = False, desc: str = "evaluating",
                      with_before: bool = False) -> dict:
    """Mean query accuracy of ``score`` over `episodes` held-out episodes, with its interval.

    ``score(tasks, episodes)`` takes a batch of tasks (on the device) and the range of their
    episode indices (a method that draws random numbers seeds them by episode, so that every
    process count meets the same numbers) and returns ``acc``, one query accuracy per task, and
    with ``with_before`` ``acc_before``, the mean accuracy before adaptation. The main rank
    shows a progress bar over its share of the episodes, with the running mean accuracy of that
    share, unless `quiet` (in a log: lines, fsl_dist/progress.py)."""
    mine = split_episodes(episodes, dist.rank, dist.world_size)
    after, before = [], []
    correct = 0.0  # this rank's per-episode accuracies summed so far: the bar's running mean
    with progress(total=len(mine), desc=desc, unit="ep", leave=False,
                  quiet=quiet or not dist.is_main) as bar:
        for start in range(mine.start, mine.stop, batch_size):
            chunk = range(start, min(start + batch_size, mine.stop))
            tasks = {k: v.to(dist.device) for k, v in episode_source.batch(0, chunk).items()}
            stats = score(tasks, chunk)
            after.append(stats["acc"].detach().cpu())
            # the mean before adaptation is all that is reported of it: one value per episode
            if with_before:
                before.append(stats["acc_before"].detach().cpu().expand(len(chunk)))
            correct += float(after[-1].double().sum())
            bar.update(len(chunk))
            # redrawn after every chunk (a chunk takes far longer than a redraw)
            bar.set_postfix(acc=f"{100 * correct / (chunk.stop - mine.start):.2f}%")
    empty = torch.zeros(0)
    acc_after = dist.gather_ragged(torch.cat(after) if after else empty)
    result = confidence_interval(acc_after)
    if with_before:
        acc_before = dist.gather_ragged(torch.cat(before) if before else empty)
        result["before_adaptation"] = confidence_interval(acc_before)["mean"]
    return result
