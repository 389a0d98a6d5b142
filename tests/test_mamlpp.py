"""MAML++ options (Antoniou et al., 2019), each against an independent computation: the
multi-step loss against per-step query losses computed by hand; derivative-order annealing
against the first-order formula before its step and finite differences from it on (in the
meta-objective and through the trainer's step); per-step learned step sizes against an inner
loop written out by hand, and through export and loading; with all of them on, the
meta-gradient against finite differences in float64 and the trainer's task-by-task path,
and under bf16 autocast within the error of bf16 rounding. Per-step batch-norm weights (BNWB)
against an inner loop that swaps in set k by hand, and through export and prediction."""

import contextlib
import copy

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

from fsl_dist.config import AlgorithmConfig, ConfigError, load_config, save_config
from fsl_dist.data.shards import load_manifest
from fsl_dist.learners import MamlFamily, learner_from_config
from fsl_dist.meta import (
    ALGORITHMS,
    InnerLoopSpec,
    LearnedInnerLR,
    adapt,
    adapt_task,
    adapted_parameter_names,
    evaluate_tasks,
    learned_inner_lr,
    meta_backward,
    meta_loss,
)
from fsl_dist.meta.inner import cross_entropy
from fsl_dist.meta.precision import InnerLossScaler
from fsl_dist.meta.spec import msl_weights
from fsl_dist.models import (
    BatchStatNorm2d,
    build_model,
    collect_batch_stats,
    inner_step,
    per_step_parameter_names,
    running_stats_norms,
    update_running_stats,
)
from fsl_dist.predict import load_model
from fsl_dist.trained import INNER_LR, build_run_model, model_inputs, read_trained, write_trained
from fsl_dist.trainer import TrainState, restore_state, train_step

from launching import ROOT
from meta_helpers import check_against_finite_differences, flat, make_tasks, rel_err, tiny_model

STEPS = 3


def tiny_bnwb_model(steps=STEPS, dtype=torch.float64, stats=False):
    """``tiny_model`` with per-step batch-norm weights, every set distinct (``stats``: and
    per-step running statistics)."""
    torch.manual_seed(0)
    model = build_model("cnn", 3, width=4, blocks=2, image_size=8, bn_steps=steps,
                        bn_stats=stats).to(dtype)
    with torch.no_grad():
        for name in per_step_parameter_names(model):
            p = model.get_parameter(name)
            p.add_(0.2 * torch.randn(p.shape, dtype=dtype))
    return model

LR = {"features": 0.3, "classifier": 0.5}


def config(*overrides):
    return load_config(ROOT / "configs" / "cnn_maml.yaml", list(overrides))


# ---------------------------------------------------------------- multi-step loss


def test_msl_weights_follow_the_reference_schedule_per_training_step():
    # S = 5 inner steps annealed over 100 training steps: the non-final weights fall by
    # 1/5/100 per step from 0.2 to the floor 0.03/5, the last rises by 4 times that.
    assert msl_weights(5, 0, 100) == pytest.approx((0.2,) * 5, rel=1e-15)
    assert msl_weights(5, 50, 100) == pytest.approx((0.1,) * 4 + (0.6,), rel=1e-12)
    floor = (0.006,) * 4 + (1 - 4 * 0.006,)
    assert msl_weights(5, 97, 100) == pytest.approx(floor, rel=1e-12)  # both bounds at 97%
    assert msl_weights(5, 99, 100) == pytest.approx(floor, rel=1e-12)
    assert msl_weights(5, 100, 100) is None  # after the annealing: the last step's loss alone
    assert msl_weights(5, 0, 0) is None  # off
    for step in range(100):
        weights = msl_weights(5, step, 100)
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)
        if step:
            before = msl_weights(5, step - 1, 100)
            assert weights[0] <= before[0] and weights[-1] >= before[-1]
    assert msl_weights(1, 3, 10) == (1.0,)


def test_the_trainer_spec_carries_the_weights_of_its_step_and_evaluation_none():
    cfg = config("algorithm.inner_steps=3", "algorithm.msl_steps=10")
    spec = InnerLoopSpec.from_config(cfg, precision="no", step=4)
    assert spec.step_weights == msl_weights(3, 4, 10)
    assert InnerLoopSpec.from_config(cfg, precision="no", step=10).step_weights is None
    assert InnerLoopSpec.from_config(cfg, precision="no").step_weights is None
    assert InnerLoopSpec.from_config(cfg, precision="no", step=4,
                                     evaluation=True).step_weights is None
    with pytest.raises(ValueError, match="one weight per inner step"):
        InnerLoopSpec("maml", inner_steps=2, inner_lr=0.4, step_weights=(1.0,))


def by_hand_query_losses(model, tasks, algorithm, steps, lrs=None):
    """[task][step] query losses after each inner step, each step count adapted afresh from
    the initial parameters with ``inner.adapt`` and scored with the whole model."""
    params = dict(model.named_parameters())
    names = adapted_parameter_names(algorithm, params)
    lrs = lrs or {n: LR[n.split(".")[0]] for n in names}
    forward = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    losses = []
    for t in range(len(tasks["support_x"])):
        per_step = []
        for k in range(1, steps + 1):
            adapted = adapt(forward, params, tasks["support_x"][t], tasks["support_y"][t],
                            adapted_names=names, lrs=lrs, steps=k).params
            per_step.append(cross_entropy(forward(adapted, tasks["query_x"][t]),
                                          tasks["query_y"][t]))
        losses.append(per_step)
    return losses


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_msl_loss_is_the_weighted_sum_of_the_per_step_query_losses(algorithm, vectorize):
    model, tasks = tiny_model(), make_tasks()
    weights = (0.2, 0.3, 0.5)
    spec = InnerLoopSpec(algorithm, inner_steps=3, inner_lr=LR, vectorize=vectorize,
                         step_weights=weights)
    loss, stats = meta_loss(model, tasks, spec)
    per_task = by_hand_query_losses(model, tasks, algorithm, 3)
    expected = sum(sum(w * q for w, q in zip(weights, task)) for task in per_task) / len(per_task)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    params = list(model.parameters())
    torch.testing.assert_close(flat(torch.autograd.grad(loss, params)),
                               flat(torch.autograd.grad(expected, params)),
                               rtol=1e-9, atol=1e-12)
    # the reported query loss stays the last step's (comparable with MSL off)
    last = sum(task[-1] for task in per_task) / len(per_task)
    torch.testing.assert_close(stats["query_loss"], last.detach().float())


# ---------------------------------------------------------------- derivative-order annealing


def first_order_formula(model, tasks, algorithm, steps):
    """The first-order meta-gradient by its definition: the query-loss gradient at the adapted
    parameters, adaptation treated as the identity, averaged over tasks."""
    params = dict(model.named_parameters())
    names = adapted_parameter_names(algorithm, params)
    forward = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    total = [torch.zeros_like(p) for p in params.values()]
    n_tasks = len(tasks["support_x"])
    for t in range(n_tasks):
        adapted = adapt(forward, params, tasks["support_x"][t], tasks["support_y"][t],
                        adapted_names=names, lrs={n: LR[n.split(".")[0]] for n in names},
                        steps=steps, first_order=True).params
        point = {n: p.detach().requires_grad_() for n, p in adapted.items()}
        loss = cross_entropy(forward(point, tasks["query_x"][t]), tasks["query_y"][t])
        for g_total, g in zip(total, torch.autograd.grad(loss, list(point.values()))):
            g_total += g / n_tasks
    return flat(total)


def annealed_config(*extra):
    return config("algorithm.inner_steps=2", "algorithm.inner_lr.features=0.3",
                  "algorithm.inner_lr.classifier=0.5", "algorithm.first_order_steps=3", *extra)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_derivative_order_switches_exactly_at_the_configured_step(algorithm):
    cfg = annealed_config(f"algorithm.name={algorithm}")
    model, tasks = tiny_model(), make_tasks()
    params = list(model.parameters())
    spec = {step: InnerLoopSpec.from_config(cfg, precision="no", step=step) for step in (2, 3)}
    assert spec[2].first_order and not spec[3].first_order
    before = flat(torch.autograd.grad(meta_loss(model, tasks, spec[2])[0], params))
    torch.testing.assert_close(before, first_order_formula(model, tasks, algorithm, 2),
                               rtol=1e-10, atol=1e-12)
    check_against_finite_differences(lambda: meta_loss(model, tasks, spec[3])[0], params)
    after = flat(torch.autograd.grad(meta_loss(model, tasks, spec[3])[0], params))
    assert rel_err(before, after) > 1e-3  # the switch changes the gradient
    # evaluation and callers without a step see the configured order (second)
    assert not InnerLoopSpec.from_config(cfg, precision="no").first_order


class OneProcess:
    """The trainer's distribution interface for a single process: the mean is the tensor."""

    def all_reduce_mean_(self, tensor):
        return tensor


def test_the_trainer_step_takes_first_order_gradients_until_the_switch():
    cfg = annealed_config()
    # float32 (the trainer's flat gradient is float32); jittered images, so that no max-pool
    # ties make the trainer's task-by-task path and meta_loss round differently
    model = tiny_model(torch.float32)
    tasks = make_tasks(dtype=torch.float32, jitter=0.1)
    state = TrainState(model, learner_from_config(cfg, model), torch.optim.Adam(model.parameters()),
                       InnerLossScaler(), InnerLossScaler(), step=2)
    for step, first_order in ((2, True), (3, False)):
        grads = {}
        for order in (True, False):
            spec = InnerLoopSpec("maml", inner_steps=2, inner_lr=LR, first_order=order)
            grads[order] = flat(torch.autograd.grad(meta_loss(model, tasks, spec)[0],
                                                    list(model.parameters())))
        out = train_step(state, tasks, cfg, OneProcess(), "no")
        assert out["second_order"] == float(not first_order)
        got = flat([p.grad for p in model.parameters()])
        assert rel_err(got, grads[first_order]) < 1e-5
        assert rel_err(got, grads[not first_order]) > 1e-3
        assert state.step == step + 1


@pytest.mark.parametrize("overrides, named", [
    (["algorithm.first_order=true", "algorithm.first_order_steps=10"],
     "algorithm.first_order_steps"),
    (["algorithm.first_order_steps=-1"], "algorithm.first_order_steps"),
    (["algorithm.msl_steps=-1"], "algorithm.msl_steps"),
])
def test_mamlpp_settings_that_cannot_work_are_named(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config(*overrides)


# ---------------------------------------------------------------- per-step step sizes (LSLR)


def distinct_per_step(model, algorithm, steps):
    """A per-step LearnedInnerLR whose every (step, tensor) size differs."""
    lrs = LearnedInnerLR(model, algorithm, LR, steps=steps).double()
    with torch.no_grad():
        lrs.per_step.mul_(1 + 0.1 * torch.arange(lrs.per_step.numel(), dtype=torch.float64)
                          .view_as(lrs.per_step) / lrs.per_step.numel())
    return lrs


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_per_step_sizes_have_one_row_per_inner_step_and_one_column_per_adapted_tensor(algorithm):
    model = tiny_model()
    names = adapted_parameter_names(algorithm, dict(model.named_parameters()))
    lrs = learned_inner_lr(model, algorithm, LR, "per_step", 3)
    assert lrs.per_step.shape == (3, len(names)) and lrs.names == names
    assert list(lrs.state_dict()) == ["per_step"]
    for k in range(3):
        for col, name in enumerate(names):
            assert lrs.per_step[k, col].item() == pytest.approx(LR[name.split(".")[0]])
    per_tensor = learned_inner_lr(model, algorithm, LR, True, 3)  # today's: one per tensor
    assert per_tensor.steps is None and len(list(per_tensor.parameters())) == len(names)


def hand_inner_loop_loss(model, tasks, names, rates):
    """The second-order meta-objective with step k of tensor l taking ``rates[k, l]``, written
    out with autograd alone."""
    params = dict(model.named_parameters())
    forward = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    total = 0
    for t in range(len(tasks["support_x"])):
        current = dict(params)
        for k in range(rates.shape[0]):
            loss = cross_entropy(forward(current, tasks["support_x"][t]), tasks["support_y"][t])
            grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=True)
            current.update({n: current[n] - rates[k, col] * g
                            for col, (n, g) in enumerate(zip(names, grads))})
        total = total + cross_entropy(forward(current, tasks["query_x"][t]),
                                      tasks["query_y"][t])
    return total / len(tasks["support_x"])


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_step_k_of_tensor_l_uses_its_own_size(algorithm, vectorize):
    model, tasks = tiny_model(), make_tasks()
    lrs = distinct_per_step(model, algorithm, 2)
    leaves = [*model.parameters(), lrs.per_step]
    loss = meta_loss(model, tasks, InnerLoopSpec(algorithm, inner_steps=2, inner_lr=lrs,
                                                 vectorize=vectorize))[0]
    expected = hand_inner_loop_loss(model, tasks, lrs.names, lrs.per_step)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    got, want = (torch.autograd.grad(value, leaves) for value in (loss, expected))
    torch.testing.assert_close(flat(got), flat(want), rtol=1e-9, atol=1e-12)
    assert (got[-1] != 0).all()  # every (step, tensor) size is meta-learned


def test_evaluation_beyond_the_learned_steps_reuses_the_last_row():
    model, tasks = tiny_model(), make_tasks()
    two = distinct_per_step(model, "maml", 2)
    three = LearnedInnerLR(model, "maml", LR, steps=3).double()
    with torch.no_grad():
        three.per_step.copy_(torch.cat([two.per_step, two.per_step[-1:]]))
    got, want = (evaluate_tasks(model, tasks, InnerLoopSpec("maml", inner_steps=3, inner_lr=lrs))
                 for lrs in (two, three))
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_per_step_sizes_are_exported_and_loaded_for_evaluation_and_prediction(packed, tmp_path):
    shards = packed("futurama")
    cfg = config(f"data.shards={shards}", "model.width=8", "algorithm.inner_steps=2",
                 "algorithm.learn_inner_lr=per_step", "eval.inner_steps=3")
    manifest = load_manifest(shards)
    model = build_run_model(cfg, model_inputs(manifest))
    lrs = learned_inner_lr(model, "maml", cfg.algorithm.inner_lr, "per_step", 2)
    with torch.no_grad():
        lrs.per_step.add_(torch.rand(lrs.per_step.shape))  # trained-looking, all distinct
    write_trained(tmp_path, model, cfg, manifest, extras={INNER_LR: lrs})
    save_config(cfg, tmp_path / "config.yaml")
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["inner_lr.per_step"],
                       lrs.per_step.detach())
    loaded = read_trained(tmp_path, "cpu").learner.inner_lr
    assert torch.equal(loaded.per_step, lrs.per_step)
    predictor = load_model(tmp_path, "cpu")
    assert predictor.learner.evaluation_steps == 3
    assert torch.equal(predictor.learner.inner_lr.per_step, lrs.per_step)


@pytest.mark.parametrize("saved_steps, resumed_steps", [(2, None), (None, 2), (2, 3)])
def test_a_checkpoint_of_other_learned_sizes_is_refused_with_the_setting(saved_steps,
                                                                         resumed_steps):
    model = tiny_model()
    saved = LearnedInnerLR(model, "maml", LR, steps=saved_steps)
    resumed = LearnedInnerLR(model, "maml", LR, steps=resumed_steps)
    state = TrainState(model, MamlFamily(model, AlgorithmConfig(), 1, inner_lr=resumed),
                       torch.optim.Adam([*model.parameters(),
                                                         *resumed.parameters()]),
                       InnerLossScaler(), InnerLossScaler())
    kind = "per_step" if saved_steps else "true"
    with pytest.raises(ConfigError, match=f"learn_inner_lr={kind}"):
        restore_state(state, {"model": model.state_dict(), "inner_lr": saved.state_dict()})


# ---------------------------------------------------------------- per-step batch-norm weights


def test_per_step_bn_weights_have_one_set_per_step_and_never_adapt():
    model = tiny_bnwb_model()
    per_step = per_step_parameter_names(model)
    assert sorted(per_step) == ["features.0.1.bias", "features.0.1.weight",
                                "features.1.1.bias", "features.1.1.weight"]
    assert all(model.get_parameter(n).shape == (STEPS, 4) for n in per_step)
    for algorithm in ALGORITHMS:
        names = learned_inner_lr(model, algorithm, LR, "per_step", STEPS).names
        assert names and not set(names) & per_step
    cfg = config("algorithm.inner_steps=3", "algorithm.per_step_bn_weights=true")
    built = build_run_model(cfg, {"in_channels": 1, "image_size": 28})
    assert built.features[0][1].weight.shape == (3, 64)
    with pytest.raises(ConfigError, match=r"algorithm\.per_step_bn_weights"):
        config("algorithm.inner_steps=0", "algorithm.per_step_bn_weights=true")
    with pytest.raises(ConfigError, match=r"set `algorithm\.per_step_bn_weights` too"):
        config("algorithm.per_step_bn_stats=true")
    with pytest.raises(ConfigError, match=r"algorithm\.vectorize"):
        config("algorithm.per_step_bn_weights=true", "algorithm.per_step_bn_stats=true",
               "algorithm.vectorize=true")


# ---------------------------------------------------------------- per-step running statistics


def test_running_stats_move_by_momentum_towards_the_mean_batch_statistics_of_each_step():
    """Forward hooks see every norm input of a second-order step without the query forward
    before adaptation: per task the support forwards of steps 0..S-1, then the query forward
    after step S-1. Pair k must move 10% of the way to the mean over tasks of forwards k."""
    model, tasks = tiny_bnwb_model(stats=True), make_tasks()
    norms = running_stats_norms(model)
    seen = {norm: [] for norm in norms}
    hooks = [norm.register_forward_hook(
        lambda module, args, out: seen[module].append(torch.var_mean(
            args[0].detach(), dim=(0, 2, 3), unbiased=True))) for norm in norms]
    before = {norm: (norm.running_mean.clone(), norm.running_var.clone()) for norm in norms}
    spec = InnerLoopSpec("maml", inner_steps=STEPS, inner_lr=LR, vectorize=False)
    with collect_batch_stats() as collector:
        meta_backward(model, tasks, spec, acc_before=False)
    update_running_stats(norms, collector.means(norms))
    for hook in hooks:
        hook.remove()
    n_tasks = len(tasks["support_x"])
    for norm in norms:
        per_task = [seen[norm][t * (STEPS + 1):(t + 1) * (STEPS + 1)] for t in range(n_tasks)]
        for k in range(STEPS):
            forwards = [f for task in per_task for f in (task[k:] if k == STEPS - 1 else [task[k]])]
            var = torch.stack([v for v, _ in forwards]).mean(0)
            mean = torch.stack([m for _, m in forwards]).mean(0)
            torch.testing.assert_close(norm.running_mean[k], 0.9 * before[norm][0][k] + 0.1 * mean)
            torch.testing.assert_close(norm.running_var[k], 0.9 * before[norm][1][k] + 0.1 * var)


def test_evaluation_normalises_step_k_with_running_pair_k_and_training_with_the_batch():
    norm = BatchStatNorm2d(4, steps=STEPS, running_stats=True).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    for k in range(STEPS + 1):
        j = min(k, STEPS - 1)
        with inner_step(k):
            trained = norm.train()(x)
            evaluated = norm.eval()(x)
        torch.testing.assert_close(trained, torch.nn.functional.batch_norm(
            x, None, None, norm.weight[j], norm.bias[j], training=True))
        torch.testing.assert_close(evaluated, torch.nn.functional.batch_norm(
            x, norm.running_mean[j], norm.running_var[j], norm.weight[j], norm.bias[j]))


def test_evaluation_with_running_stats_is_the_same_under_vmap_and_the_loop():
    model, tasks = tiny_bnwb_model(stats=True), make_tasks()
    with torch.no_grad():
        for norm in running_stats_norms(model):
            norm.running_mean.normal_(0, 0.3)
            norm.running_var.uniform_(0.5, 2)
    loop, vmap = (evaluate_tasks(model, tasks, InnerLoopSpec("boil", inner_steps=STEPS,
                                                             inner_lr=LR, vectorize=v))
                  for v in (False, True))
    for key in loop:
        torch.testing.assert_close(loop[key], vmap[key], rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="loop path only"), collect_batch_stats():
        meta_loss(model, tasks, InnerLoopSpec("boil", inner_steps=STEPS, inner_lr=LR,
                                              vectorize=True))


def hand_bnwb_losses(model, tasks, algorithm, steps, lrs):
    """Per-step query losses (after each step) of a second-order inner loop on a plain model
    (one batch-norm set) into which set k is swapped by hand for the forwards of step k."""
    plain = build_model("cnn", 3, width=4, blocks=2, image_size=8).double()
    sets = dict(model.named_parameters())
    per_step = per_step_parameter_names(model)
    adapted = [n for n in adapted_parameter_names(algorithm, sets) if n not in per_step]
    totals = [0] * steps
    for t in range(len(tasks["support_x"])):
        current = {n: p for n, p in sets.items() if n not in per_step}

        def forward(k, x, current=current):
            params = {**current, **{n: sets[n][k] for n in per_step}}
            return functional_call(plain, params, (x,))
        for k in range(steps):
            loss = cross_entropy(forward(k, tasks["support_x"][t]), tasks["support_y"][t])
            grads = torch.autograd.grad(loss, [current[n] for n in adapted], create_graph=True)
            current.update({n: current[n] - lrs[n] * g for n, g in zip(adapted, grads)})
            totals[k] = totals[k] + cross_entropy(forward(k, tasks["query_x"][t]),
                                                  tasks["query_y"][t])
    return [total / len(tasks["support_x"]) for total in totals]


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_inner_step_k_uses_batch_norm_set_k(algorithm, vectorize):
    model, tasks = tiny_bnwb_model(), make_tasks()
    lrs = {n: LR[n.split(".")[0]] for n in adapted_parameter_names(algorithm,
                                                                   dict(model.named_parameters()))}
    weights = (0.2, 0.3, 0.5)
    spec = InnerLoopSpec(algorithm, inner_steps=STEPS, inner_lr=LR, vectorize=vectorize,
                         step_weights=weights)
    loss = meta_loss(model, tasks, spec)[0]
    expected = sum(w * q for w, q in zip(weights, hand_bnwb_losses(model, tasks, algorithm,
                                                                   STEPS, lrs)))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    leaves = list(model.parameters())
    got, want = (torch.autograd.grad(value, leaves) for value in (loss, expected))
    torch.testing.assert_close(flat(got), flat(want), rtol=1e-9, atol=1e-12)
    for name, grad in zip(dict(model.named_parameters()), got):
        if name in per_step_parameter_names(model):
            assert (grad.abs().sum(1) > 0).all(), name  # every set is meta-learned
    # Without the multi-step loss only the last step's query forward counts: still every set
    # (sets 0..S-2 through the support forwards that make the adapted weights).
    last = meta_loss(model, tasks, spec.replace(step_weights=None))[0]
    grads = torch.autograd.grad(last, leaves)
    for name, grad in zip(dict(model.named_parameters()), grads):
        if name in per_step_parameter_names(model):
            assert (grad.abs().sum(1) > 0).all(), name


def test_evaluation_beyond_the_per_step_sets_keeps_the_last_set():
    three, tasks = tiny_bnwb_model(3), make_tasks()
    four = tiny_bnwb_model(4)
    with torch.no_grad():
        for name, p in four.named_parameters():
            source = three.get_parameter(name)
            p.copy_(torch.cat([source, source[-1:]]) if p.shape != source.shape else source)
    got, want = (evaluate_tasks(net, tasks, InnerLoopSpec("maml", inner_steps=4, inner_lr=LR))
                 for net in (three, four))
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_per_step_bn_weights_and_stats_are_exported_and_predicted_with(packed, tmp_path):
    shards = packed("futurama")
    cfg = config(f"data.shards={shards}", "model.width=8", "algorithm.inner_steps=2",
                 "algorithm.per_step_bn_weights=true", "algorithm.per_step_bn_stats=true",
                 "algorithm.learn_inner_lr=per_step")
    manifest = load_manifest(shards)
    model = build_run_model(cfg, model_inputs(manifest))
    with torch.no_grad():
        for name in per_step_parameter_names(model):
            model.get_parameter(name).add_(torch.rand(model.get_parameter(name).shape))
        for norm in running_stats_norms(model):
            norm.running_mean.normal_(0, 0.1)
            norm.running_var.uniform_(0.5, 2)
    lrs = learned_inner_lr(model, "maml", cfg.algorithm.inner_lr, "per_step", 2)
    write_trained(tmp_path, model, cfg, manifest, extras={INNER_LR: lrs})
    save_config(cfg, tmp_path / "config.yaml")
    trained = read_trained(tmp_path, "cpu").model
    predictor = load_model(tmp_path, "cpu")
    side, channels = manifest["image_size"], manifest["channels"]
    tasks = make_tasks(tasks=2, n_way=cfg.task.n_way, k_shot=1, n_query=2, size=side,
                       dtype=torch.float32, jitter=0.1)
    tasks = {k: v.expand(*v.shape[:2], channels, side, side).contiguous() if k.endswith("_x")
             else v for k, v in tasks.items()}
    spec = InnerLoopSpec.from_config(cfg, precision="no", inner_lr=lrs, evaluation=True)
    assert spec.inner_steps > 2  # evaluation beyond the trained steps: the last set
    want = evaluate_tasks(model, tasks, spec)
    predicted = predictor.learner.spec(precision="no", evaluation=True)
    for net, inner in ((trained, spec), (predictor.model, predicted)):
        got = evaluate_tasks(net, tasks, inner)
        torch.testing.assert_close(got["acc_after_per_task"], want["acc_after_per_task"])
        torch.testing.assert_close(got["query_loss"], want["query_loss"])
    # Prediction's adapt-then-score path scores with the last set, as evaluation does.
    losses = [cross_entropy(adapt_task(predictor.model, tasks["support_x"][t],
                                       tasks["support_y"][t], predicted)
                            .logits(tasks["query_x"][t]), tasks["query_y"][t])
              for t in range(2)]
    torch.testing.assert_close(sum(losses) / 2, want["query_loss"])


@pytest.mark.parametrize("saved, resumed, error", [
    ((3, False), (0, False), "size mismatch"), ((0, False), (3, False), "size mismatch"),
    ((3, False), (2, False), "size mismatch"), ((3, False), (3, True), "Missing key"),
    ((3, True), (3, False), "Unexpected key")])
def test_a_checkpoint_of_other_batch_norm_sets_is_refused_with_the_setting(saved, resumed, error):
    saved, model = (tiny_bnwb_model(steps, stats=stats) for steps, stats in (saved, resumed))
    state = TrainState(model, MamlFamily(model, AlgorithmConfig(), 1, inner_lr=LR),
                       torch.optim.Adam(model.parameters()), InnerLossScaler(),
                       InnerLossScaler())
    with pytest.raises(ConfigError, match=rf"algorithm\.per_step_bn_weights.*{error}"):
        restore_state(state, {"model": saved.state_dict()})


# ---------------------------------------------------------------- all options on


def all_options_spec(algorithm, vectorize, model):
    """The trainer's spec at step 5 of a config with every option of this module on: mid-way
    through the multi-step loss annealing, after the switch to second order, per-step sizes
    (the model brings its per-step batch-norm weights: ``tiny_bnwb_model``)."""
    cfg = config(f"algorithm.name={algorithm}", "algorithm.inner_steps=3",
                 "algorithm.msl_steps=10", "algorithm.first_order_steps=2",
                 "algorithm.learn_inner_lr=per_step", f"algorithm.vectorize={vectorize}",
                 "algorithm.per_step_bn_weights=true")
    lrs = distinct_per_step(model, algorithm, 3)
    spec = InnerLoopSpec.from_config(cfg, precision="no", inner_lr=lrs, step=5)
    assert not spec.first_order and spec.step_weights == msl_weights(3, 5, 10)
    return spec, lrs


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_options_meta_gradient_matches_finite_differences(algorithm, vectorize):
    # With per-step running statistics, collected on the loop path as the trainer does: they
    # are detached, and meta-training normalises with batch statistics.
    model, tasks = tiny_bnwb_model(stats=not vectorize), make_tasks()
    spec, lrs = all_options_spec(algorithm, vectorize, model)
    with collect_batch_stats() if not vectorize else contextlib.nullcontext():
        check_against_finite_differences(lambda: meta_loss(model, tasks, spec)[0],
                                         [*model.parameters(), lrs.per_step])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_options_trainer_path_gives_the_meta_loss_gradient(algorithm):
    model, tasks = tiny_bnwb_model(), make_tasks()
    spec, lrs = all_options_spec(algorithm, False, model)
    leaves = [*model.parameters(), lrs.per_step]
    expected = flat(torch.autograd.grad(meta_loss(model, tasks, spec)[0], leaves))
    meta_backward(model, tasks, spec, workers=2)
    torch.testing.assert_close(flat([p.grad for p in leaves]), expected, rtol=1e-10,
                               atol=1e-13)


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_options_under_bf16_err_as_bf16_rounding_does(algorithm, vectorize):
    """As tests/test_meta_precision.py: the second-order meta-gradient of a fresh Conv-4 moves
    by tens of percent when only its weights are rounded to bf16 (the floor no placement of
    precision beats); bf16 autocast with every option on must stay within 2x of that floor
    (measured 0.5-0.9x for maml and boil, 1.4x for loop ANIL; vmap ANIL measured exactly 0
    on CPU, as on main without any option: autocast does not reach its reused features
    under vmap there)."""
    torch.manual_seed(0)
    model = build_model("cnn", 5, width=16, image_size=28, bn_steps=3)
    tasks = make_tasks(tasks=2, n_way=5, k_shot=1, n_query=3, size=28, dtype=torch.float32,
                       jitter=0.1)
    spec, lrs = all_options_spec(algorithm, vectorize, model)
    spec = spec.replace(inner_lr=lrs.float())

    def gradient(net, spec):
        loss, stats = meta_loss(net, tasks, spec)
        assert stats["inner_nonfinite"] == 0
        return flat(torch.autograd.grad(loss, [*net.parameters(), lrs.per_step]))

    reference = gradient(model, spec)
    mixed = gradient(model, spec.replace(precision="bf16"))
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    assert torch.isfinite(mixed).all()
    assert rel_err(mixed, reference) <= 2 * rel_err(gradient(rounded, spec), reference)


@pytest.mark.parametrize("name", ["omniglot_cnn_maml_20w1s", "miniimagenet_cnn_maml_5w1s"])
def test_the_mamlpp_configs_load_with_their_options_on(name):
    cfg = load_config(ROOT / "configs" / "mamlpp" / f"{name}.yaml")
    algo = cfg.algorithm
    assert (algo.learn_inner_lr, algo.inner_steps, cfg.optim.schedule) == ("per_step", 5, "cosine")
    assert algo.msl_steps > 0 and not algo.first_order and algo.first_order_steps == 0
    assert algo.per_step_bn_weights
