"""The learner interface (fsl_dist/learners): the families the config offers are those
registered, ProtoNet's loss and gradient equal a hand-written float64 reference, and the
shipped family configs (configs/protonet, ridge, protomaml) load, validate and build their
families."""

import math
from pathlib import Path

import pytest
import torch

from fsl_dist.config import (
    CHOICES,
    Config,
    ConfigError,
    ProtoNetConfig,
    RidgeConfig,
    load_config,
    validate,
)
from fsl_dist.learners import (
    LEARNERS,
    ProtoNet,
    RidgeHead,
    check_way,
    learner_from_config,
    learner_from_description,
)
from fsl_dist.models import build_model
from fsl_dist.trained import build_run_model

from meta_helpers import flat, make_tasks

N_WAY, K_SHOT, N_QUERY = 3, 2, 2


def test_the_config_offers_exactly_the_registered_families():
    assert set(CHOICES["algorithm.name"]) == set(LEARNERS)


def tiny_model():
    torch.manual_seed(0)
    return build_model("cnn", N_WAY, width=4, blocks=2, image_size=8).double()


def reference_loss(model, tasks, scale) -> torch.Tensor:
    """ProtoNet's mean query cross-entropy, written out: per class the mean of its support
    features, per query the squared distances summed coordinate by coordinate, then
    -log softmax of -scale x distance, by hand."""
    total = 0.0
    count = len(tasks["support_x"])
    for t in range(count):
        support = model.features(tasks["support_x"][t]).flatten(1)
        query = model.features(tasks["query_x"][t]).flatten(1)
        labels = tasks["support_y"][t].tolist()
        protos = []
        for c in range(N_WAY):
            members = [support[i] for i in range(len(labels)) if labels[i] == c]
            protos.append(sum(members) / len(members))
        loss = 0.0
        for i, y in enumerate(tasks["query_y"][t].tolist()):
            logits = [-scale * ((query[i] - p) ** 2).sum() for p in protos]
            top = max(v.item() for v in logits)
            log_norm = top + torch.log(sum(torch.exp(v - top) for v in logits))
            loss = loss + (log_norm - logits[y])
        total = total + loss / len(tasks["query_y"][t])
    return total / count


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_protonet_loss_and_gradient_equal_the_written_out_reference(scale):
    model = tiny_model()
    tasks = make_tasks(tasks=2, n_way=N_WAY, k_shot=K_SHOT, n_query=N_QUERY, jitter=0.1)
    learner = ProtoNet(model, ProtoNetConfig(scale=scale))
    stats = learner.meta_backward(tasks, step=0, precision="no")
    got = flat([p.grad if p.grad is not None else torch.zeros_like(p)
                for p in model.parameters()])
    model.zero_grad()
    want = reference_loss(model, tasks, scale)
    want_grad = flat([g if g is not None else torch.zeros_like(p) for g, p in zip(
        torch.autograd.grad(want, list(model.parameters()), allow_unused=True),
        model.parameters())])
    assert stats["query_loss"].item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(got, want_grad, rtol=1e-10, atol=1e-12)
    assert got.abs().sum() > 0
    # the head is unused: no gradient reaches it
    assert model.classifier.weight.grad is None


def test_a_learned_scale_gets_its_gradient_from_the_reference():
    model = tiny_model()
    tasks = make_tasks(tasks=2, n_way=N_WAY, k_shot=K_SHOT, n_query=N_QUERY, jitter=0.1)
    learner = ProtoNet(model, ProtoNetConfig(scale=0.5, learn_scale=True))
    learner.scale.double()
    learner.meta_backward(tasks, step=0, precision="no")
    log_scale = learner.scale.log_scale.detach().clone().requires_grad_()
    assert log_scale.item() == pytest.approx(math.log(0.5), rel=1e-7)
    want = torch.autograd.grad(reference_loss(model, tasks, log_scale.exp()), log_scale)[0]
    torch.testing.assert_close(learner.scale.log_scale.grad, want, rtol=1e-10, atol=1e-12)
    assert learner.parameters()[-1] is learner.scale.log_scale  # stepped by the optimizer


def hand_cross_entropy(logits: list, y: int) -> torch.Tensor:
    top = max(v.item() for v in logits)
    return top + torch.log(sum(torch.exp(v - top) for v in logits)) - logits[y]


def reference_ridge_loss(model, tasks, lam, scale) -> torch.Tensor:
    """The ridge head's mean query cross-entropy in the primal form the Woodbury form equals:
    W = (X^T X + lam I)^-1 X^T Y, with an explicit inverse of the D x D matrix."""
    total = 0.0
    for t in range(len(tasks["support_x"])):
        x = model.features(tasks["support_x"][t]).flatten(1)
        q = model.features(tasks["query_x"][t]).flatten(1)
        y = torch.zeros(len(x), N_WAY, dtype=x.dtype)
        for i, label in enumerate(tasks["support_y"][t].tolist()):
            y[i, label] = 1.0
        w = torch.linalg.inv(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype)) @ x.T @ y
        loss = 0.0
        for i, label in enumerate(tasks["query_y"][t].tolist()):
            logits = [scale * (q[i] * w[:, c]).sum() for c in range(N_WAY)]
            loss = loss + hand_cross_entropy(logits, label)
        total = total + loss / len(tasks["query_y"][t])
    return total / len(tasks["support_x"])


def test_ridge_loss_and_gradients_equal_the_primal_reference():
    model = tiny_model()
    tasks = make_tasks(tasks=2, n_way=N_WAY, k_shot=K_SHOT, n_query=N_QUERY, jitter=0.1)
    learner = RidgeHead(model, RidgeConfig(lam=2.0, scale=0.5, learn_scale=True,
                                           learn_lambda=True))
    learner.learned.double()
    stats = learner.meta_backward(tasks, step=0, precision="no")
    extras = [learner.learned.log_scale, learner.learned.log_lam]
    got = [p.grad if p.grad is not None else torch.zeros_like(p)
           for p in [*model.parameters(), *extras]]
    model.zero_grad()
    leaves = [p.detach().clone().requires_grad_() for p in extras]
    want = reference_ridge_loss(model, tasks, leaves[1].exp(), leaves[0].exp())
    grads = torch.autograd.grad(want, [*model.parameters(), *leaves], allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p)
             for g, p in zip(grads, [*model.parameters(), *leaves])]
    assert stats["query_loss"].item() == pytest.approx(want.item(), rel=1e-10)
    torch.testing.assert_close(flat(got), flat(grads), rtol=1e-8, atol=1e-10)
    assert flat(got[:-2]).abs().sum() > 0 and all(g.abs() > 0 for g in got[-2:])


@pytest.mark.parametrize("family, section, n_way", [(RidgeHead, RidgeConfig, 4),
                                                     (ProtoNet, ProtoNetConfig, 5)],
                         ids=["ridge", "protonet"])
def test_evaluation_and_prediction_score_alike_for_any_way(family, section, n_way):
    model = tiny_model()
    learner = family(model, section())
    tasks = make_tasks(tasks=2, n_way=n_way, k_shot=K_SHOT, n_query=N_QUERY, jitter=0.1)
    evaluated = learner.evaluate_tasks(tasks, precision="no")["acc_after_per_task"]
    for t in range(2):
        logits = learner.adapt(tasks["support_x"][t], tasks["support_y"][t],
                               precision="no").logits(tasks["query_x"][t])
        assert logits.shape == (n_way * N_QUERY, n_way)  # N-way from a model with a 3-way head
        predicted = (logits.argmax(-1) == tasks["query_y"][t]).float().mean()
        assert predicted.item() == evaluated[t].item()


def shifted_by_hand(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved dy rows down and dx columns right, the wrapped-around edge set to 0."""
    out = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if dy:
        out[..., slice(0, dy) if dy > 0 else slice(dy, None), :] = 0
    if dx:
        out[..., :, slice(0, dx) if dx > 0 else slice(dx, None)] = 0
    return out


@pytest.mark.parametrize("family, section", [(RidgeHead, RidgeConfig), (ProtoNet, ProtoNetConfig)],
                         ids=["ridge", "protonet"])
def test_a_test_shift_averages_five_shifted_copies_and_prediction_agrees(family, section):
    model = tiny_model()
    learner = family(model, section())
    tasks = make_tasks(tasks=2, n_way=N_WAY, k_shot=K_SHOT, n_query=N_QUERY, jitter=0.1)
    plain = learner.evaluate_tasks(tasks, precision="no")["query_loss"]
    learner.test_shift = 1
    evaluated = learner.evaluate_tasks(tasks, precision="no")
    assert evaluated["query_loss"] != plain  # the shift is applied at evaluation

    def features(x):  # the mean over the image and its four one-pixel shifts, by hand
        copies = [shifted_by_hand(x, dy, dx) for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1),
                                                            (0, -1))]
        return torch.stack([model.features(c).flatten(1) for c in copies]).mean(0)

    for t in range(2):
        head = learner.fit(features(tasks["support_x"][t]), tasks["support_y"][t], N_WAY)
        by_hand = learner.score(head, features(tasks["query_x"][t]))
        predicted = learner.adapt(tasks["support_x"][t], tasks["support_y"][t],
                                  precision="no").logits(tasks["query_x"][t])
        torch.testing.assert_close(predicted.double(), by_hand.double(), rtol=1e-6, atol=1e-8)
        accuracy = (by_hand.argmax(-1) == tasks["query_y"][t]).float().mean()
        assert accuracy.item() == evaluated["acc_after_per_task"][t].item()


def test_a_test_shift_is_refused_for_the_maml_family_and_below_zero():
    cfg = Config()
    cfg.eval.test_shift = 1
    with pytest.raises(ConfigError, match="eval.test_shift.*maml adapts by gradient steps"):
        validate(cfg)
    cfg.algorithm.name = "protonet"
    validate(cfg)
    cfg.eval.test_shift = -1
    with pytest.raises(ConfigError, match="eval.test_shift` = -1 must not be negative"):
        validate(cfg)


def test_the_model_file_carries_the_test_shift_to_prediction():
    cfg = Config()
    cfg.algorithm.name, cfg.eval.test_shift = "protonet", 2
    model = tiny_model()
    evaluation = {"inner_steps": 0, "precision": None}
    description = {"algorithm": {"name": "protonet"}, "protonet": {}}
    assert learner_from_description(description, evaluation, model).test_shift == 0  # older
    assert learner_from_description(description, {**evaluation, "test_shift": 2},
                                    model).test_shift == 2
    assert learner_from_config(cfg, model).test_shift == 2


def test_another_way_at_evaluation_needs_a_family_without_a_head():
    cfg = Config()
    cfg.eval.n_way = 20
    with pytest.raises(ConfigError, match="eval.n_way` = 20 differs from `task.n_way` = 5"):
        check_way(cfg)
    cfg.algorithm.name = "protonet"
    check_way(cfg)
    assert cfg.evaluation_way() == 20


def test_the_config_builds_each_family():
    cfg = Config()
    model = build_model("cnn", 5, width=4, blocks=2, image_size=8)
    for name in sorted(LEARNERS):
        cfg.algorithm.name = name
        assert isinstance(learner_from_config(cfg, model), LEARNERS[name])


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Each family's config folder and the (algorithm.name, algorithm.proto_head) its configs train.
FAMILY_FOLDERS = {"protonet": ("protonet", False), "ridge": ("ridge", False),
                  "protomaml": ("maml", True)}
FAMILY_CONFIGS = sorted(p for folder in FAMILY_FOLDERS for p in (CONFIGS / folder).glob("*.yaml"))
PROTONET_CONFIGS = [p for p in FAMILY_CONFIGS if p.parent.name == "protonet"]
IMAGES = {"omniglot": {"in_channels": 1, "image_size": 28},
          "miniimagenet": {"in_channels": 3, "image_size": 84}}


@pytest.mark.parametrize("path", FAMILY_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_family_config_builds_its_family_and_trains_with_at_least_its_test_ways(path):
    cfg = load_config(path)
    assert (cfg.algorithm.name, cfg.algorithm.proto_head) == FAMILY_FOLDERS[path.parent.name]
    assert cfg.task.n_way >= cfg.evaluation_way()
    check_way(cfg)
    model = build_run_model(cfg, IMAGES[cfg.data.dataset])
    assert isinstance(learner_from_config(cfg, model), LEARNERS[cfg.algorithm.name])


@pytest.mark.parametrize("path", PROTONET_CONFIGS, ids=lambda p: p.stem)
def test_each_protonet_config_has_the_papers_schedule(path):
    cfg = load_config(path)
    # Adam at 1e-3, halved every 2000 episodes
    assert cfg.optim.lr == 1e-3 and cfg.optim.decay_factor == 0.5
    assert cfg.optim.decay_at == list(range(2000, cfg.train.steps, 2000))


# (folder, queries per class): ProtoNet's 5; R2D2's 600-image 60-way episodes, 10 a class
@pytest.mark.parametrize("folder, queries", [("protonet", 5), ("ridge", 9)])
def test_the_omniglot_configs_train_60_way_and_test_5_and_20_way(folder, queries):
    for name, test_way in (("omniglot_5w1s", 5), ("omniglot_20w1s", 20)):
        cfg = load_config(CONFIGS / folder / f"{name}.yaml")
        assert (cfg.task.n_way, cfg.task.k_shot, cfg.task.q_query) == (60, 1, queries)
        assert cfg.evaluation_way() == test_way and cfg.data.split == "vinyals"
