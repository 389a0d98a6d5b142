"""`model.init_from`'s copy of a trained body (fsl_dist/backbone.py): exactly the body's
tensors, bit for bit, the head left as it was; a body that does not fit is refused in one line
naming the keys and shapes."""

from __future__ import annotations

import pytest
import torch

from fsl_dist.backbone import load_backbone
from fsl_dist.config import ConfigError
from fsl_dist.models import build_model


def conv4(n_way: int, seed: int, **options):
    torch.manual_seed(seed)
    return build_model("cnn", n_way, width=4, in_channels=1, image_size=28, **options)


def test_the_body_is_copied_bit_for_bit_and_the_head_is_left_fresh():
    trained = conv4(80, seed=1)  # a pre-trained head over 80 classes
    model = conv4(5, seed=2)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.")}
    copied = load_backbone(model, trained.state_dict(), "runs/pre")
    assert copied == sorted(k for k in trained.state_dict() if k.startswith("features."))
    after = model.state_dict()
    for name in copied:
        assert torch.equal(after[name], trained.state_dict()[name]), name
    for name, value in head.items():
        assert torch.equal(after[name], value), name


def test_a_body_of_another_width_is_refused_naming_keys_and_shapes():
    model = conv4(5, seed=0)
    torch.manual_seed(0)
    wider = build_model("cnn", 5, width=8, in_channels=1, image_size=28)
    with pytest.raises(ConfigError) as refused:
        load_backbone(model, wider.state_dict(), "runs/wide")
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith("`model.init_from` = runs/wide: its body does not fit")
    assert "features.0.0.weight [8, 1, 3, 3] there, [4, 1, 3, 3] here" in line
    before = conv4(5, seed=0).state_dict()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_a_body_with_other_blocks_is_refused_naming_the_missing_keys():
    torch.manual_seed(0)
    shallow = build_model("cnn", 5, width=4, in_channels=1, image_size=28, blocks=3)
    with pytest.raises(ConfigError, match=r"it lacks features\.3\.0\.weight, "
                       r"features\.3\.1\.bias, features\.3\.1\.weight"):
        load_backbone(conv4(5, seed=0), shallow.state_dict(), "runs/shallow")


def test_per_step_batch_norm_sets_each_start_from_the_trained_weights():
    trained = conv4(80, seed=1)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            p.add_(0.01 * torch.randn_like(p))  # batch-norm weights that are not all ones
    model = conv4(5, seed=2, bn_steps=3, bn_stats=True)
    load_backbone(model, trained.state_dict(), "runs/pre")
    source, after = trained.state_dict(), model.state_dict()
    weight = after["features.1.1.weight"]
    assert weight.shape == (3, 4)
    assert all(torch.equal(weight[k], source["features.1.1.weight"]) for k in range(3))
    assert torch.equal(after["features.1.1.running_var"], torch.ones(3, 4))  # a fresh model's


def test_a_model_without_a_features_body_is_refused():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 5))
    with pytest.raises(ConfigError, match="has no `features` body"):
        load_backbone(model, conv4(5, seed=0).state_dict(), "runs/pre")
