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


def test_model_options():
    assert build_model("cnn", 3, width=8, blocks=2, image_size=8).classifier.in_features == 8 * 2 * 2
    assert build_model("resnet", 3, widths=(4, 8)).classifier.in_features == 8
    assert build_model("resnet", 3, width=4).classifier.in_features == 32
    with pytest.raises(ValueError):
        build_model("vit", 5)
    with pytest.raises(ValueError):
        build_model("cnn", 5, image_size=8)  # four halvings of 8 leave nothing


def test_batch_norm_uses_batch_statistics_in_train_and_eval():
    torch.manual_seed(0)
    norm = BatchStatNorm2d(3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.normal_()
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    expected = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True)
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm.eval()(x), expected)  # no running statistics at test time
    # Transductive: an example's output depends on the rest of its batch.
    assert not torch.allclose(norm(x)[:2], norm(x[:2]))


def test_batch_norm_statistics_stay_float32_under_autocast():
    norm = BatchStatNorm2d(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(torch.randn(3, 2, 4, 4).bfloat16())
    assert out.dtype == torch.float32
