"""The mini-ImageNet-scale models: ResNet-12 ("resnet12") and Conv-4 with 32 filters at 84x84 RGB.

Shapes and options here; the second-order meta-gradient of a tiny ResNet-12 against finite
differences (float64) and vmap against the loop (float32), with DropBlock off: it is random, so
a finite difference of it means nothing.
"""

import re
from pathlib import Path

import pytest
import torch

from fsl_dist.meta import ALGORITHMS, InnerLoopSpec, meta_backward, meta_loss
from fsl_dist.models import build_model
from fsl_dist.models.resnet12 import block_widths

from meta_helpers import check_against_finite_differences, flat, make_tasks, rel_err, spec


def rgb(tasks):
    """Three distinct channels from the one-channel synthetic tasks."""
    def three(x):
        return torch.cat([x, x.flip(-1), x.flip(-2)], dim=2)
    return {k: three(v) if k.endswith("_x") else v for k, v in tasks.items()}


def tiny_resnet12(dtype=torch.float64, n_way=3):
    torch.manual_seed(0)
    return build_model("resnet12", n_way, width=2, in_channels=3, image_size=16).to(dtype)


def test_resnet12_widths_follow_the_literature_ratios():
    assert block_widths(64) == (64, 160, 320, 640)
    assert block_widths(4) == (4, 10, 20, 40)
    model = build_model("resnet12", 5)
    assert model.classifier.in_features == 640
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(12.4e6, rel=0.01)


def test_resnet12_on_84x84_rgb():
    torch.manual_seed(0)
    model = build_model("resnet12", 5, width=4, in_channels=3, image_size=84)
    x = torch.rand(6, 3, 84, 84)
    assert model.features(x).shape == (6, 40)
    assert model(x).shape == (6, 5)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("features.", "classifier.")) for n in names)
    assert [n for n in names if n.startswith("classifier.")] == ["classifier.weight",
                                                                 "classifier.bias"]
    assert list(model.buffers()) == []


def test_resnet12_refuses_an_image_too_small_for_four_halvings():
    with pytest.raises(ValueError):
        build_model("resnet12", 5, width=2, image_size=8)


def test_dropblock_is_active_only_in_training_mode():
    torch.manual_seed(0)
    model = build_model("resnet12", 5, width=4, image_size=32, drop_rate=0.2, dropblock_size=3)
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))
    off = build_model("resnet12", 5, width=4, image_size=32).train()
    torch.testing.assert_close(off(x), off(x))  # drop_rate 0: deterministic in training too


def test_conv4_with_32_filters_at_84x84_takes_one_meta_step():
    torch.manual_seed(0)
    model = build_model("cnn", 5, width=32, in_channels=3, image_size=84)
    assert model.classifier.in_features == 32 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5
    tasks = rgb(make_tasks(tasks=2, n_way=5, k_shot=1, n_query=2, size=84, dtype=torch.float32,
                           jitter=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = meta_backward(model, tasks, InnerLoopSpec("maml", inner_steps=2, inner_lr=0.01))
    assert torch.isfinite(stats["query_loss"]) and stats["inner_nonfinite"] == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resnet12_second_order_meta_gradient_matches_finite_differences(algorithm, vectorize):
    model = tiny_resnet12()
    tasks = rgb(make_tasks(size=16, jitter=0.1))
    params = list(model.parameters())

    # Smaller steps than the Conv-4 tests': at lr 0.3 the adapted ResNet sits within 1e-6 of a
    # ReLU or max-pool kink along some directions, where a central difference is meaningless.
    def loss_fn():
        return meta_loss(model, tasks, spec(algorithm, vectorize=vectorize, inner_lr=0.05))[0]
    check_against_finite_differences(loss_fn, params)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resnet12_vmap_and_loop_agree_in_float32(algorithm):
    model = tiny_resnet12(torch.float32, n_way=5)
    tasks = rgb(make_tasks(tasks=3, n_way=5, k_shot=1, n_query=3, size=16, dtype=torch.float32,
                           jitter=0.1))
    results = {}
    for vectorize in (False, True):
        loss, stats = meta_loss(model, tasks, spec(algorithm, inner_lr=0.1, vectorize=vectorize))
        results[vectorize] = loss, stats, flat(torch.autograd.grad(loss, model.parameters()))
    (loss_l, stats_l, grad_l), (loss_v, stats_v, grad_v) = results[False], results[True]
    assert rel_err(loss_v, loss_l) < 1e-5
    # 1e-4, not the Conv-4 test's 1e-5: twelve convolutions deep, the float32 rounding that
    # differs between the batched and the per-task convolution grows a little more.
    assert rel_err(grad_v, grad_l) < 1e-4
    for key in stats_l:
        torch.testing.assert_close(stats_v[key], stats_l[key], rtol=1e-5, atol=1e-6)


def test_dropblock_from_the_config_trains_and_is_off_whenever_evaluating():
    """`model.drop_rate` reaches ResNet-12; meta-training draws masks on the loop and the vmap
    paths (a mask per task under vmap), and evaluate_tasks scores as the model without
    DropBlock would, leaving the model in training mode afterwards."""
    from fsl_dist.config import ConfigError, load_config
    from fsl_dist.meta import evaluate_tasks
    from fsl_dist.trained import build_run_model

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "miniimagenet" / "resnet_boil_5w1s.yaml",
                      ["model.width=4", "model.drop_rate=0.3", "model.dropblock_size=3"])
    torch.manual_seed(0)
    model = build_run_model(cfg, {"in_channels": 3, "image_size": 32})
    assert all(block.drop.drop_rate == 0.3 for block in model.features[:4])
    plain = build_run_model(load_config(root / "configs" / "miniimagenet" /
                                        "resnet_boil_5w1s.yaml", ["model.width=4"]),
                            {"in_channels": 3, "image_size": 32})
    plain.load_state_dict(model.state_dict())
    tasks = rgb(make_tasks(tasks=2, n_way=5, k_shot=1, n_query=2, size=32, dtype=torch.float32,
                           jitter=0.1))
    for vectorize in (False, True):
        spec = InnerLoopSpec("boil", inner_steps=1, inner_lr=0.3, vectorize=vectorize)
        model.zero_grad()
        meta_backward(model, tasks, spec, workers=2)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        first = evaluate_tasks(model, tasks, spec, workers=2)
        again = evaluate_tasks(model, tasks, spec, workers=2)
        reference = evaluate_tasks(plain, tasks, spec, workers=2)
        for key in ("acc_after", "query_loss"):
            torch.testing.assert_close(first[key], again[key])
            torch.testing.assert_close(first[key], reference[key])
        assert model.training
    for override, message in (("model.drop_rate=1", "must be in [0, 1)"),
                              ("model.name=cnn", "has none")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(root / "configs" / "miniimagenet" / "resnet_boil_5w1s.yaml",
                        ["model.drop_rate=0.1", override])
