import pytest
import torch
import torch.nn.functional as F

from fsl_dist.models import BatchStatNorm2d, build_model


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_models_on_omniglot_inputs(name):
    torch.manual_seed(0)
    model = build_model(name, n_way=5)
    logits = model(torch.rand(10, 1, 28, 28))
    assert logits.shape == (10, 5)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("features.", "classifier.")) for n in names)
    assert any(n.startswith("classifier.") for n in names)
    assert list(model.buffers()) == []  # nothing that forward could change


@pytest.mark.parametrize("name, options, features", [
    ("cnn", dict(width=8, blocks=2, image_size=8), 8 * 2 * 2),
    ("resnet", dict(widths=(4, 8)), 8),
    ("resnet", dict(width=4), 32),
], ids=["cnn-width-blocks-size", "resnet-widths", "resnet-width"])
def test_model_options(name, options, features):
    assert build_model(name, 3, **options).classifier.in_features == features


@pytest.mark.parametrize("name, options", [
    ("vit", {}),
    ("cnn", dict(image_size=8)),  # four halvings of 8 leave nothing
], ids=["unknown-model", "cnn-image-too-small"])
def test_impossible_models_are_refused(name, options):
    with pytest.raises(ValueError):
        build_model(name, 5, **options)


def norm_and_input():
    torch.manual_seed(0)
    norm = BatchStatNorm2d(3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.normal_()
    return norm, torch.randn(4, 3, 5, 5) * 3 + 1


def test_batch_norm_uses_batch_statistics_in_train_and_eval():
    norm, x = norm_and_input()
    expected = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True)
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm.eval()(x), expected)  # no running statistics at test time


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm_is_transductive(mode):
    """An example's output depends on the rest of its batch."""
    norm, x = norm_and_input()
    norm.train(mode == "train")
    assert not torch.allclose(norm(x)[:2], norm(x[:2]))


def test_batch_norm_statistics_stay_float32_under_autocast():
    norm = BatchStatNorm2d(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(torch.randn(3, 2, 4, 4).bfloat16())
    assert out.dtype == torch.float32
