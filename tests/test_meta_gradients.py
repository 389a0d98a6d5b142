"""Correctness of the meta-gradient: finite differences in float64, the first-order formula,
which parts adapt, vmap against loop, and the ANIL fast path."""

import pytest
import torch
from torch.func import functional_call

from fsl_dist.meta import (
    ALGORITHMS,
    LearnedInnerLR,
    adapt,
    adapted_parameter_names,
    meta_backward,
    meta_loss,
)
from fsl_dist.meta.inner import cross_entropy
from fsl_dist.models import build_model

from meta_helpers import (
    SETTINGS,
    check_against_finite_differences,
    flat,
    make_tasks,
    rel_err,
    spec,
    tiny_model,
)


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_second_order_meta_gradient_matches_finite_differences(algorithm, vectorize):
    model, tasks = tiny_model(), make_tasks()
    params = list(model.parameters())

    def loss_fn():
        return meta_loss(model, tasks, spec(algorithm, vectorize=vectorize))[0]
    check_against_finite_differences(loss_fn, params)


def test_learned_step_sizes_and_mse_inner_loss_match_finite_differences():
    model, tasks = tiny_model(), make_tasks()
    lrs = LearnedInnerLR(model, "maml", {"features": 0.3, "classifier": 0.5}).double()
    params = [*model.parameters(), *lrs.parameters()]

    def loss_fn():
        return meta_loss(model, tasks, spec("maml", inner_lr=lrs, inner_loss="mse"))[0]
    check_against_finite_differences(loss_fn, params)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_first_order_is_the_query_gradient_at_the_adapted_parameters(algorithm):
    model, tasks = tiny_model(), make_tasks()
    params = dict(model.named_parameters())
    first = torch.autograd.grad(
        meta_loss(model, tasks, spec(algorithm, first_order=True))[0],
        list(params.values()))
    second = torch.autograd.grad(
        meta_loss(model, tasks, spec(algorithm))[0], list(params.values()))

    # The first-order formula: adapt, then take the query-loss gradient at the adapted point
    # as if the adapted parameters were the initial ones (adaptation = identity).
    names = adapted_parameter_names(algorithm, params)
    lr = SETTINGS["inner_lr"]
    forward = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    expected = [torch.zeros_like(p) for p in params.values()]
    n_tasks = len(tasks["support_x"])
    for t in range(n_tasks):
        adapted = adapt(forward, params, tasks["support_x"][t], tasks["support_y"][t],
                        adapted_names=names, lrs={n: lr[n.split(".")[0]] for n in names},
                        steps=SETTINGS["inner_steps"], first_order=True).params
        point = {n: p.detach().requires_grad_() for n, p in adapted.items()}
        loss = cross_entropy(forward(point, tasks["query_x"][t]), tasks["query_y"][t])
        for e, g in zip(expected, torch.autograd.grad(loss, list(point.values()))):
            e += g / n_tasks
    torch.testing.assert_close(flat(first), flat(expected), rtol=1e-10, atol=1e-12)
    assert rel_err(flat(first), flat(second)) > 1e-3  # the second-order term is not negligible


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_which_parts_adapt_and_which_are_meta_learned(algorithm):
    model, tasks = tiny_model(), make_tasks()
    params = dict(model.named_parameters())
    names = adapted_parameter_names(algorithm, params)
    forward = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    adapted = adapt(forward, params, tasks["support_x"][0], tasks["support_y"][0],
                    adapted_names=names, lrs={n: 0.5 for n in names}, steps=2).params
    changed = {part: any(not torch.equal(adapted[n], params[n]) for n in params
                         if n.startswith(part)) for part in ("features", "classifier")}
    expected = {"maml": {"features": True, "classifier": True},
                "boil": {"features": True, "classifier": False},
                "anil": {"features": False, "classifier": True}}[algorithm]
    assert changed == expected

    loss, _ = meta_loss(model, tasks, spec(algorithm))
    loss.backward()
    for part in ("features", "classifier"):  # the outer step meta-learns both parts
        assert any(p.grad.abs().sum() > 0 for n, p in params.items() if n.startswith(part))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_vmap_and_loop_agree_in_float32(algorithm):
    torch.manual_seed(0)
    model = build_model("cnn", 5, width=8, image_size=28)
    # Jittered images: on exactly binary images, max-pool windows hold exact ties that
    # float32 rounding (which differs between the batched and the per-task convolution)
    # breaks differently, which moved one BOIL meta-gradient by 2% from float64 (measured;
    # the vmap one stayed at 2e-6). Ties are a property of the data, not of either path.
    tasks = make_tasks(tasks=3, n_way=5, k_shot=1, n_query=3, size=28, dtype=torch.float32,
                       jitter=0.1)
    results = {}
    for vectorize in (False, True):
        loss, stats = meta_loss(model, tasks, spec(algorithm, inner_lr=0.4, vectorize=vectorize))
        results[vectorize] = loss, stats, flat(torch.autograd.grad(loss, model.parameters()))
    (loss_l, stats_l, grad_l), (loss_v, stats_v, grad_v) = results[False], results[True]
    assert rel_err(loss_v, loss_l) < 1e-5
    assert rel_err(grad_v, grad_l) < 1e-5
    for key in stats_l:
        torch.testing.assert_close(stats_v[key], stats_l[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_anil_feature_reuse_gives_the_full_path_result(vectorize):
    model, tasks = tiny_model(), make_tasks()
    out = {}
    for reuse in (True, False):
        loss, stats = meta_loss(model, tasks, spec("anil", vectorize=vectorize,
                                                   reuse_features=reuse))
        out[reuse] = loss, stats, flat(torch.autograd.grad(loss, model.parameters()))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out[True][2], out[False][2], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_proto_maml_meta_gradient_matches_finite_differences(algorithm, vectorize):
    """Proto-MAML: the head starts from the support prototypes (W = 2c, b = -||c||^2), then the
    second-order inner loop; the meta-gradient includes the path through the prototypes."""
    model, tasks = tiny_model(), make_tasks()
    # the trained head is replaced by the prototypes' in every task: only the body is trained
    params = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]

    def loss_fn():
        return meta_loss(model, tasks, spec(algorithm, vectorize=vectorize,
                                            proto_head=True))[0]
    check_against_finite_differences(loss_fn, params)
    # the trainer's path gives the same gradient, and zero to the unused head
    model.zero_grad()
    meta_backward(model, tasks, spec(algorithm).replace(proto_head=True), workers=1)
    want = torch.autograd.grad(loss_fn(), params)
    assert rel_err(flat([p.grad for p in params]), flat(want)) < 1e-10
    assert not model.classifier.weight.grad.any()


def test_proto_maml_starts_from_the_prototype_classifier():
    """Before adaptation, the proto head classifies as nearest-prototype (squared Euclidean):
    W = 2c, b = -||c||^2 differs from -||f - c||^2 by ||f||^2, the same for every class."""
    from fsl_dist.meta import evaluate_tasks

    model, tasks = tiny_model(), make_tasks(n_query=3)
    stats = evaluate_tasks(model, tasks, spec("maml", inner_steps=1).replace(
        proto_head=True, inner_lr=1e-12))
    for t in range(len(tasks["support_x"])):
        support = model.features(tasks["support_x"][t])
        query = model.features(tasks["query_x"][t])
        protos = torch.stack([support[tasks["support_y"][t] == c].mean(0) for c in range(3)])
        nearest = torch.cdist(query, protos).argmin(-1)
        want = (nearest == tasks["query_y"][t]).double().mean()
        assert stats["acc_after_per_task"][t].item() == pytest.approx(want.item())
