"""Mixed precision: bf16 autocast, fp16 inner-loss scaling, non-finite inner gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fsl_dist.meta import ALGORITHMS, InnerLoopSpec, InnerLossScaler, meta_loss
from fsl_dist.meta.precision import bf16_cpu_warning, cpu_has_bf16_instructions
from fsl_dist.models import build_model

from meta_helpers import flat, make_tasks, rel_err


@pytest.fixture(scope="module")
def conv4_and_tasks():
    torch.manual_seed(0)
    model = build_model("cnn", 5, width=64)  # the real Conv-4
    tasks = make_tasks(tasks=2, n_way=5, k_shot=1, n_query=5, size=28, dtype=torch.float32)
    return model, tasks


def meta_grad(model, tasks, algorithm, steps, inner_loss_scale=None, **options):
    spec = InnerLoopSpec(algorithm, inner_steps=steps, inner_lr=0.4, **options)
    loss, stats = meta_loss(model, tasks, spec, inner_loss_scale=inner_loss_scale)
    return flat(torch.autograd.grad(loss, model.parameters())), stats


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bf16_meta_gradient_error_is_that_of_bf16_rounding(conv4_and_tasks, algorithm, steps):
    """Measured: the second-order meta-gradient of a freshly initialised Conv-4 is itself
    sensitive to bf16-sized perturbations (ReLU and max-pool kinks make the inner Hessian
    jump): rounding only the weights to bf16 once, then computing everything in float32,
    moves the 5-step MAML meta-gradient by 0.6-1.8 relative. No placement of precision can
    beat that floor, so the test asks that bf16 autocast stays within 2x of it, and holds
    one-step ANIL (whose Hessian is the smooth float32 head's) to cosine 0.99. Five-step
    ANIL measured cosine 0.92 here: not claimed."""
    model, tasks = conv4_and_tasks
    reference, _ = meta_grad(model, tasks, algorithm, steps)
    mixed, stats = meta_grad(model, tasks, algorithm, steps, precision="bf16")
    assert torch.isfinite(mixed).all() and stats["inner_nonfinite"] == 0
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    floor, _ = meta_grad(rounded, tasks, algorithm, steps)
    assert rel_err(mixed, reference) <= 2 * rel_err(floor, reference)
    if algorithm == "anil" and steps == 1:
        assert F.cosine_similarity(mixed, reference, dim=0) >= 0.99


def test_inner_loss_scale_is_neutral_in_float32():
    torch.manual_seed(0)
    model = build_model("cnn", 3, width=8, blocks=2, image_size=8)
    tasks = make_tasks(dtype=torch.float32)
    plain, _ = meta_grad(model, tasks, "maml", 2)
    scaled, _ = meta_grad(model, tasks, "maml", 2, inner_loss_scale=1024.0)
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-7)


def test_fp16_with_scaling_tracks_float32_and_overflow_is_reported(conv4_and_tasks):
    model, tasks = conv4_and_tasks
    reference, _ = meta_grad(model, tasks, "anil", 1)
    mixed, stats = meta_grad(model, tasks, "anil", 1, precision="fp16", inner_loss_scale=1024.0)
    assert stats["inner_nonfinite"] == 0
    assert F.cosine_similarity(mixed, reference, dim=0) >= 0.99

    scaler = InnerLossScaler(init_scale=2.0**40)  # fp16 gradients overflow at this scale
    _, stats = meta_loss(model, tasks, InnerLoopSpec("maml", 1, 0.4, precision="fp16"),
                         inner_loss_scale=scaler.scale)
    assert stats["inner_nonfinite"] == 1.0
    scaler.update(bool(stats["inner_nonfinite"]))
    assert scaler.scale == 2.0**39


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_nonfinite_inner_gradient_is_reported_not_raised(vectorize):
    torch.manual_seed(0)
    model = build_model("cnn", 3, width=4, blocks=2, image_size=8)
    tasks = make_tasks(dtype=torch.float32)
    spec = InnerLoopSpec("maml", inner_steps=1, inner_lr=0.4, vectorize=vectorize)
    clean = meta_loss(model, tasks, spec)[1]
    assert clean["inner_nonfinite"] == 0.0
    tasks["support_x"][1, 0, 0, 0, 0] = float("nan")
    loss, stats = meta_loss(model, tasks, spec)
    assert stats["inner_nonfinite"] == 1.0
    assert not torch.isfinite(loss)  # left visible for the trainer to skip the step


def test_inner_loss_scaler_grows_backs_off_and_round_trips():
    scaler = InnerLossScaler(init_scale=8.0, growth_interval=2)
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 16.0
    scaler.update(False)
    scaler.update(True)
    assert scaler.scale == 8.0
    scaler.update(False)
    other = InnerLossScaler()
    other.load_state_dict(scaler.state_dict())
    assert other.state_dict() == scaler.state_dict()
    other.update(False)
    assert other.scale == 16.0  # the growth tracker travelled too


AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n"
AMX = "processor\t: 0\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [
    (AVX2_ONLY, False), (AVX512_BF16, True), (AMX, True), (ARM_BF16, True), ("", None),
], ids=["avx2-only", "avx512_bf16", "amx_bf16", "arm-bf16", "unknown"])
def test_bf16_instructions_are_read_from_cpuinfo_flags(cpuinfo, native):
    assert cpu_has_bf16_instructions(cpuinfo) is native


def test_bf16_is_warned_about_only_on_a_cpu_without_bf16_instructions():
    warning = bf16_cpu_warning("cpu", "bf16", AVX2_ONLY)
    assert warning and "precision=bf16" in warning and "precision=no" in warning
    assert bf16_cpu_warning("cpu", "bf16", AVX512_BF16) is None
    assert bf16_cpu_warning("cpu", "no", AVX2_ONLY) is None
    assert bf16_cpu_warning("cuda", "bf16", AVX2_ONLY) is None
    assert bf16_cpu_warning("cpu", "bf16", "") is None  # unknown CPU: no claim
