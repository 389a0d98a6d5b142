"""MAML++ options (Antoniou et al., 2019), each against an independent computation: the
multi-step loss against per-step query losses computed by hand; derivative-order annealing
against the first-order formula before its step and finite differences from it on (in the
meta-objective and through the trainer's step)."""

import pytest
import torch
from torch.func import functional_call

from fsl_dist.config import ConfigError, load_config
from fsl_dist.meta import ALGORITHMS, InnerLoopSpec, adapt, adapted_parameter_names, meta_loss
from fsl_dist.meta.inner import cross_entropy
from fsl_dist.meta.precision import InnerLossScaler
from fsl_dist.meta.spec import msl_weights
from fsl_dist.trainer import TrainState, train_step

from launching import ROOT
from meta_helpers import flat, make_tasks, rel_err
from test_meta_gradients import check_against_finite_differences, tiny_model

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
    state = TrainState(model, cfg.algorithm.inner_lr, torch.optim.Adam(model.parameters()),
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
