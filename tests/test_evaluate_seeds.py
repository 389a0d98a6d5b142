"""Evaluation over several episode seeds: the combined interval, and the same episodes per seed
as single-seed evaluations."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from fsl_dist.config import ConfigError, load_config
from fsl_dist.distributed import Distributed
from fsl_dist.evaluate import combine_seeds, confidence_interval, t_quantile_975
from fsl_dist.learners import learner_from_config
from fsl_dist.models import build_model
from fsl_dist.runs import evaluate_held_out

ROOT = Path(__file__).resolve().parents[1]


def per_seed_results(seed_accuracies):
    return [{**confidence_interval(acc), "eval_seed": seed}
            for seed, acc in seed_accuracies.items()]


def test_t_quantile_table_and_expansion():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(4) == 2.776
    assert t_quantile_975(30) == 2.042
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=1e-3)
    assert t_quantile_975(10**6) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_combined_mean_and_episode_interval_are_those_of_all_episodes_pooled():
    g = torch.Generator().manual_seed(0)
    accs = {seed: (torch.rand(50 + 10 * seed, generator=g) > 0.1).float() for seed in range(3)}
    combined = combine_seeds(per_seed_results(accs))
    pooled = confidence_interval(torch.cat(list(accs.values())))
    assert combined["mean"] == pytest.approx(pooled["mean"], rel=1e-12)
    assert combined["ci95_episodes"] == pytest.approx(pooled["ci95"], rel=1e-9)
    assert combined["episodes"] == pooled["episodes"] and combined["seeds"] == [0, 1, 2]


def test_seed_interval_is_the_t_interval_of_the_seed_means_and_the_larger_one_counts():
    # Seeds whose means differ far more than their episodes vary: the seed interval dominates.
    accs = {1: torch.tensor([1.0, 1.0, 0.8, 1.0]), 2: torch.tensor([0.6, 0.6, 0.8, 0.6]),
            3: torch.tensor([0.8, 0.8, 1.0, 0.8])}
    combined = combine_seeds(per_seed_results(accs))
    means = [100 * float(a.double().mean()) for a in accs.values()]
    expected = 4.303 * statistics.stdev(means) / math.sqrt(3)
    assert combined["seed_means"] == pytest.approx(means)
    assert combined["seed_std"] == pytest.approx(statistics.stdev(means))
    assert combined["ci95_seeds"] == pytest.approx(expected)
    assert combined["ci95"] == combined["ci95_seeds"] > combined["ci95_episodes"]
    assert combined["low"] == pytest.approx(combined["mean"] - expected)
    assert combined["seed_range"] == pytest.approx(max(means) - min(means))


def test_one_seed_is_not_combined():
    with pytest.raises(ValueError, match="two seeds"):
        combine_seeds(per_seed_results({0: torch.ones(3)}))


@pytest.fixture(scope="module")
def tiny_run(packed, tmp_path_factory):
    cfg = load_config(ROOT / "configs" / "cnn_boil.yaml",
                      [f"data.shards={packed('futurama')}", "model.width=8", "eval.batch_size=8",
                       "eval.inner_steps=1"])
    torch.manual_seed(0)
    model = build_model("cnn", cfg.task.n_way, width=8)
    learner = learner_from_config(cfg, model, inner_lr=0.4)
    return cfg, learner, tmp_path_factory.mktemp("run"), Distributed()


def test_each_seed_of_a_multi_seed_evaluation_meets_its_single_seed_episodes(tiny_run):
    cfg, learner, run_dir, dist = tiny_run
    common = dict(precision="no", episodes=8)
    singles = [evaluate_held_out(learner, cfg, dist, run_dir, seeds=[seed],
                                 out_name=f"one-{seed}.json", **common) for seed in (7, 8)]
    both = evaluate_held_out(learner, cfg, dist, run_dir, seeds=[7, 8], out_name="both.json",
                             **common)
    assert [s["eval_seed"] for s in singles] == [7, 8]
    assert both["seed_means"] == [s["mean"] for s in singles]
    assert both["episodes"] == 16 and both["part"] == "test"
    written = json.loads((run_dir / "both.json").read_text())
    assert written["seeds"] == [7, 8] and written["ci95"] == both["ci95"]


def test_a_repeated_seed_is_refused(tiny_run):
    cfg, learner, run_dir, dist = tiny_run
    with pytest.raises(ConfigError, match="repeat"):
        evaluate_held_out(learner, cfg, dist, run_dir, precision="no", episodes=4,
                          seeds=[3, 3], out_name="never.json")
    assert not (run_dir / "never.json").exists()


def test_queries_replace_the_trained_query_count(tiny_run):
    """One protocol for runs trained with different Q: every episode has `queries` per class."""
    cfg, learner, run_dir, dist = tiny_run
    result = evaluate_held_out(learner, cfg, dist, run_dir, precision="no", episodes=4,
                               queries=3, out_name="q3.json")
    assert result["q_query"] == 3 and cfg.task.q_query != 3
    assert json.loads((run_dir / "q3.json").read_text())["q_query"] == 3


@pytest.mark.parametrize("queries, message", [
    (0, "TaskSpec.q_query must be a positive integer"),
    (20, r"k_shot \+ q_query = 5 \+ 20 = 25 exceeds the 20 images per class"),
])
def test_a_bad_query_count_is_refused_and_nothing_is_written(tiny_run, queries, message):
    cfg, learner, run_dir, dist = tiny_run
    with pytest.raises(ConfigError, match=message):  # the CLI's one line and exit 2
        evaluate_held_out(learner, cfg, dist, run_dir, precision="no", episodes=4,
                          queries=queries, out_name="bad-q.json")
    assert not (run_dir / "bad-q.json").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--episodes", "0", "argument --episodes: 0 must be at least 1"),  # was: the default, quietly
    ("--inner-steps", "0", "argument --inner-steps: 0 must be at least 1"),  # was: a traceback
    ("--ways", "-2", "argument --ways: -2 must be at least 1"),
    ("--shots", "one", "argument --shots: 'one' is not a whole number"),
    ("--test-shift", "-1", "argument --test-shift: -1 must be at least 0"),
])
def test_the_evaluate_command_refuses_a_count_below_one_in_one_line(capsys, flag, value,
                                                                     message):
    from fsl_dist.cli.evaluate import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(["--run-dir", "runs/any", flag, value])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_test_shift_is_refused_where_no_head_is_fitted_to_features(tiny_run):
    from fsl_dist.cli.evaluate import use_test_shift
    from fsl_dist.learners import ProtoNet

    cfg, learner, run_dir, dist = tiny_run  # BOIL: adapts by gradient steps
    with pytest.raises(ConfigError, match="--test-shift 1: test-time shifts average"):
        use_test_shift(learner, 1, "adapt")
    protonet = ProtoNet(learner.model, cfg.protonet)
    with pytest.raises(ConfigError, match="--method adapt"):
        use_test_shift(protonet, 1, "centroid")
    use_test_shift(protonet, 2, "adapt")
    result = evaluate_held_out(protonet, cfg, dist, run_dir, precision="no", episodes=2,
                               out_name="shift.json")
    assert result["test_shift"] == 2
    assert json.loads((run_dir / "shift.json").read_text())["test_shift"] == 2
