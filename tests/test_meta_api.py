"""The public surface the trainer and evaluation code against."""

import pytest
import torch

from fsl_dist.meta import (
    ALGORITHMS,
    InnerLoopSpec,
    LearnedInnerLR,
    adapted_parameter_names,
    default_vectorize,
    evaluate_tasks,
    meta_loss,
    resolve_inner_lr,
)
from fsl_dist.models import build_model

from meta_helpers import make_tasks


def tiny():
    torch.manual_seed(0)
    return build_model("cnn", 3, width=4, blocks=2, image_size=8), make_tasks(dtype=torch.float32)


def test_stats_are_detached_scalars_ready_for_all_reduce():
    model, tasks = tiny()
    loss, stats = meta_loss(model, tasks, InnerLoopSpec("maml", inner_steps=1, inner_lr=0.4))
    assert loss.requires_grad and loss.dim() == 0
    assert {"acc_before", "acc_after", "query_loss", "inner_loss", "inner_nonfinite"} <= set(stats)
    for value in stats.values():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_evaluate_tasks_adapts_under_no_grad(vectorize):
    model, tasks = tiny()
    spec = InnerLoopSpec("maml", inner_steps=2, inner_lr=0.4)
    _, train_stats = meta_loss(model, tasks, spec)
    with torch.no_grad():
        stats = evaluate_tasks(model, tasks, spec.replace(vectorize=vectorize))
    assert stats["acc_after_per_task"].shape == (2,)
    for key in ("acc_before", "acc_after", "query_loss", "inner_loss"):
        torch.testing.assert_close(stats[key], train_stats[key])  # same forward values
    assert all(p.grad is None for p in model.parameters())


NAMES = ["features.0.weight", "features.0.bias", "classifier.weight"]


@pytest.mark.parametrize("algorithm, adapted", [
    ("maml", NAMES), ("boil", NAMES[:2]), ("anil", NAMES[2:])])
def test_adapted_names(algorithm, adapted):
    assert adapted_parameter_names(algorithm, NAMES) == adapted


def test_the_algorithms_are_maml_boil_and_anil():
    assert set(ALGORITHMS) == {"maml", "boil", "anil"}


def test_an_unknown_algorithm_is_refused():
    with pytest.raises(ValueError):
        adapted_parameter_names("reptile", NAMES)


def test_step_sizes_are_per_part():
    assert resolve_inner_lr({"features": 0.1, "classifier": 0.2}, NAMES) == {
        NAMES[0]: 0.1, NAMES[1]: 0.1, NAMES[2]: 0.2}


def test_a_part_without_a_step_size_is_named():
    with pytest.raises(ValueError, match="classifier"):
        resolve_inner_lr({"features": 0.1}, NAMES)


def test_learned_inner_lr_is_meta_learned():
    model, tasks = tiny()
    lrs = LearnedInnerLR(model, "boil", 0.3)
    assert all(k.startswith("lrs.features__") for k in lrs.state_dict())
    loss, _ = meta_loss(model, tasks, InnerLoopSpec("boil", inner_steps=1, inner_lr=lrs))
    loss.backward()
    assert all(p.grad is not None and p.grad != 0 for p in lrs.parameters())


def test_learned_step_sizes_of_one_algorithm_cannot_serve_another():
    model, tasks = tiny()
    lrs = LearnedInnerLR(model, "boil", 0.3)
    with pytest.raises(ValueError):  # BOIL's step sizes cannot serve MAML's head
        meta_loss(model, tasks, InnerLoopSpec("maml", inner_steps=1, inner_lr=lrs))


@pytest.mark.parametrize("device, model, expected", [
    ("cpu", None, False), ("cpu", "cnn", False), ("cpu", "resnet", False),
    (torch.device("cuda", 3), None, True)], ids=["cpu", "cpu-cnn", "cpu-resnet", "cuda"])
def test_default_vectorize_is_per_device_type(device, model, expected):
    args = (device,) if model is None else (device, build_model(model, 5))
    assert default_vectorize(*args) is expected
