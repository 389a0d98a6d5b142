"""MAML++ options (Antoniou et al., 2019), each against an independent computation: the
multi-step loss against per-step query losses computed by hand."""

import pytest
import torch
from torch.func import functional_call

from fsl_dist.config import load_config
from fsl_dist.meta import ALGORITHMS, InnerLoopSpec, adapt, adapted_parameter_names, meta_loss
from fsl_dist.meta.inner import cross_entropy
from fsl_dist.meta.spec import msl_weights

from launching import ROOT
from meta_helpers import flat, make_tasks
from test_meta_gradients import tiny_model

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
