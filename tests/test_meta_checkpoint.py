"""The checkpointed inner loop (``algorithm.checkpoint``: steps, blocks) gives the default
path's meta-gradient, for MAML, BOIL and ANIL with the MAML++ options: bitwise where the order
of the sums is the same (first order; steps on plain MAML and BOIL), otherwise within 1e-6
relative in float32 (1e-13 in float64): the engine adds a shared leaf's parts in another order
(learned step sizes, the multi-step loss, ANIL's reused features), and blocks adds the
second-order terms up block by block."""

import pytest
import torch

from fsl_dist.config import CHOICES, ConfigError, load_config
from fsl_dist.learners import learner_from_config
from fsl_dist.meta import ALGORITHMS, InnerLoopSpec, LearnedInnerLR, meta_backward, meta_loss
from fsl_dist.meta.objective import loop_path_note
from fsl_dist.meta.precision import InnerLossScaler
from fsl_dist.meta.spec import CHECKPOINT_LEVELS
from fsl_dist.models import (
    build_model,
    collect_batch_stats,
    per_step_parameter_names,
    running_stats_norms,
)
from fsl_dist.trainer import TrainState, train_step

from launching import ROOT
from meta_helpers import flat, make_tasks, rel_err

LEVELS = ("steps", "blocks")
LR = {"features": 0.3, "classifier": 0.5}
STEPS = 3


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """The levels against the default in float32: on one thread, so that the comparison is of
    the levels' sums, not of how many threads split a convolution's (ResNet-12's blocks level
    measured 1.00015e-6 with two threads, under 1e-6 with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(name, dtype=torch.float32, mamlpp=False, **options):
    """Tiny Conv-4 or residual backbone; ``mamlpp``: per-step batch-norm weights (and running
    statistics), every set distinct."""
    torch.manual_seed(0)
    per_step = dict(bn_steps=STEPS, bn_stats=True) if mamlpp else {}
    if name == "cnn":
        model = build_model("cnn", 3, width=4, blocks=2, image_size=8, **per_step, **options)
    elif name == "resnet":
        model = build_model("resnet", 3, widths=(4, 6), image_size=8, **per_step, **options)
    else:
        model = build_model("resnet12", 3, width=4, in_channels=1, image_size=16, **options)
    with torch.no_grad():
        for p in map(model.get_parameter, per_step_parameter_names(model)):
            p.add_(0.2 * torch.randn(p.shape))
    return model.to(dtype)


def spec_for(model, algorithm, level, mamlpp, first_order=False):
    """The inner loop with MAML++'s options when ``mamlpp``: learned per-step sizes, the
    multi-step loss (the model brings per-step batch norms)."""
    lrs = LearnedInnerLR(model, algorithm, LR, steps=STEPS if mamlpp else None)
    lrs = lrs.to(next(model.parameters()).dtype)
    return InnerLoopSpec(algorithm, STEPS, lrs, first_order=first_order, vectorize=False,
                         checkpoint=level,
                         step_weights=(0.2, 0.3, 0.5) if mamlpp else None), lrs


def trainer_gradient(model, tasks, algorithm, level, mamlpp, first_order=False):
    """``meta_backward``'s gradient (the trainer's call) w.r.t. the model and step sizes, and
    the batch statistics it collected."""
    spec, lrs = spec_for(model, algorithm, level, mamlpp, first_order)
    leaves = [*model.parameters(), *lrs.parameters()]
    for p in leaves:
        p.grad = None
    with collect_batch_stats() as collector:
        meta_backward(model, tasks, spec, workers=1)
    grads = flat([torch.zeros_like(p) if p.grad is None else p.grad for p in leaves])
    return grads, collector.means(running_stats_norms(model))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("mamlpp", [False, True], ids=["plain", "mamlpp"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", ["cnn", "resnet", "resnet12"])
def test_every_level_gives_the_default_meta_gradient(name, algorithm, mamlpp, first_order):
    # resnet12: the benchmark's backbone (its blocks are residual stages), at 16x16
    model = small_model(name, mamlpp=mamlpp)
    tasks = make_tasks(dtype=torch.float32, jitter=0.1, size=16 if name == "resnet12" else 8)
    default, stats = trainer_gradient(model, tasks, algorithm, "none", mamlpp, first_order)
    for level in LEVELS:
        got, got_stats = trainer_gradient(model, tasks, algorithm, level, mamlpp, first_order)
        # The recomputed forwards collect no batch statistics a second time.
        torch.testing.assert_close(got_stats, stats, rtol=0, atol=0, equal_nan=True)
        assert rel_err(got, default) < 1e-6, level
        if first_order or (level == "steps" and algorithm != "anil" and not mamlpp):
            assert torch.equal(got, default), level  # the same sums in the same order


@pytest.mark.parametrize("level", LEVELS)
def test_float64_levels_agree_to_rounding(level):
    model, tasks = small_model("resnet", torch.float64, mamlpp=True), make_tasks()
    default, _ = trainer_gradient(model, tasks, "maml", "none", True)
    got, _ = trainer_gradient(model, tasks, "maml", level, True)
    assert rel_err(got, default) < 1e-13


@pytest.mark.parametrize("level", LEVELS)
def test_dropblock_draws_the_same_masks_when_recomputed(level):
    # ResNet-12 with DropBlock: a recomputed step or block must redraw the forward's masks.
    model = small_model("resnet12", drop_rate=0.3, dropblock_size=3)
    tasks = make_tasks(n_query=2, size=16, dtype=torch.float32, jitter=0.1)
    torch.manual_seed(1)
    default, _ = trainer_gradient(model, tasks, "maml", "none", False)
    torch.manual_seed(1)
    got, _ = trainer_gradient(model, tasks, "maml", level, False)
    assert rel_err(got, default) < 1e-6
    torch.manual_seed(2)  # other masks, another gradient: the masks mattered
    assert rel_err(trainer_gradient(model, tasks, "maml", level, False)[0], default) > 1e-3


def test_meta_loss_with_checkpointing_gives_the_same_loss_and_gradient():
    model, tasks = small_model("cnn"), make_tasks(dtype=torch.float32, jitter=0.1)
    params = list(model.parameters())
    results = {}
    for level in ("none", "blocks"):
        spec = InnerLoopSpec("boil", STEPS, LR, vectorize=False, checkpoint=level)
        loss, stats = meta_loss(model, tasks, spec)
        results[level] = (loss.detach(), stats, flat(torch.autograd.grad(loss, params)))
    assert torch.equal(results["none"][0], results["blocks"][0])
    assert results["none"][1] == results["blocks"][1]
    # the tasks' parts of a leaf's gradient meet in another order in the engine
    assert rel_err(results["blocks"][2], results["none"][2]) < 1e-6


def test_checkpointing_takes_the_loop_path_and_refuses_vmap():
    model, tasks = small_model("cnn"), make_tasks(dtype=torch.float32, jitter=0.1)
    with pytest.raises(ValueError, match="loop path"):
        InnerLoopSpec("maml", 2, LR, vectorize=True, checkpoint="steps")
    loop = InnerLoopSpec("maml", 2, LR, vectorize=False)
    unset = InnerLoopSpec("maml", 2, LR, checkpoint="steps")  # vectorize None: the loop
    grads = []
    for spec in (loop, unset):
        model.zero_grad(set_to_none=True)
        meta_backward(model, tasks, spec, workers=1)
        grads.append(flat([p.grad for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def config(*overrides):
    return load_config(ROOT / "configs" / "cnn_maml.yaml", list(overrides))


def test_config_refuses_checkpointing_under_vmap_and_unknown_levels():
    assert CHOICES["algorithm.checkpoint"] == CHECKPOINT_LEVELS  # the config offers the spec's
    with pytest.raises(ConfigError, match=r"algorithm\.checkpoint.*algorithm\.vectorize"):
        config("algorithm.checkpoint=steps", "algorithm.vectorize=true")
    with pytest.raises(ConfigError, match=r"algorithm\.checkpoint"):
        config("algorithm.checkpoint=layers")


class OneProcess:
    """The trainer's distribution interface for a single process: the mean is the tensor."""

    def all_reduce_mean_(self, tensor):
        return tensor


def test_the_trainer_step_recomputes_each_inner_step_with_the_configured_level():
    # Observable: with steps, every support forward runs twice (once in the forward, once in
    # the outer backward); the gradient is the default's.
    grads, forwards = {}, {}
    for level in ("none", "steps"):
        cfg = config("algorithm.inner_steps=2", "algorithm.inner_lr=0.4",
                     f"algorithm.checkpoint={level}")
        model = small_model("cnn")
        tasks = make_tasks(dtype=torch.float32, jitter=0.1)
        state = TrainState(model, learner_from_config(cfg, model),
                           torch.optim.SGD(model.parameters(), lr=0.0), InnerLossScaler(),
                           InnerLossScaler(), step=0)
        calls = []
        model.features[0].register_forward_hook(lambda *_: calls.append(1))
        train_step(state, tasks, cfg, OneProcess(), "no", acc_before=False)
        grads[level] = flat([p.grad for p in model.parameters()])
        forwards[level] = len(calls)
    n_tasks = 2
    # per task: 2 support forwards and 1 query forward; steps adds the 2 recomputed ones
    assert forwards == {"none": 3 * n_tasks, "steps": 5 * n_tasks}
    assert torch.equal(grads["steps"], grads["none"])


@pytest.mark.parametrize("device, vectorize, overrides, said", [
    ("cuda", None, ["algorithm.checkpoint=blocks"], "algorithm.checkpoint=blocks"),
    ("cuda", None, ["algorithm.meta_gradient=implicit"], "algorithm.meta_gradient=implicit"),
    ("cuda", None, [], None),  # vmap as usual
    ("cuda", False, ["algorithm.checkpoint=steps"], None),  # the user chose the loop
    ("cpu", None, ["algorithm.checkpoint=steps"], None),  # the loop is CPU's default anyway
], ids=["cuda-blocks", "cuda-implicit", "cuda-none", "cuda-loop-chosen", "cpu-steps"])
def test_one_note_says_when_checkpointing_changes_the_devices_default_path(
        device, vectorize, overrides, said):
    cfg = config(*overrides, f"algorithm.vectorize={'null' if vectorize is None else 'false'}")
    note = loop_path_note(InnerLoopSpec.from_config(cfg, precision="no"), small_model("cnn"),
                          torch.device(device))
    if said is None:
        assert note is None
    else:
        assert note.startswith(f"note: {said} runs the tasks in a loop, not through cuda's "
                               "default vmap") and "\n" not in note
