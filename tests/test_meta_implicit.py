"""Implicit meta-gradients (iMAML): against the exact gradient of a proximal problem solved in
closed form in float64, conjugate gradients against a direct solve, and no graph kept through
the inner steps."""

import json
import math

import pytest
import torch
from torch import nn

from fsl_dist.config import ConfigError, load_config
from fsl_dist.learners import learner_from_config
from fsl_dist.meta import InnerLoopSpec, evaluate_tasks, meta_backward
from fsl_dist.meta.implicit import conjugate_gradient
from fsl_dist.meta.inner import INNER_LOSSES, adapt, cross_entropy
from fsl_dist.meta.objective import _adapt_task, _plan, _task_forward
from fsl_dist.meta.precision import InnerLossScaler
from fsl_dist.models import build_model
from fsl_dist.trainer import TrainState, train_step

from launching import ROOT, run
from meta_helpers import make_tasks

LAM = 2.0


class LinearHead(nn.Module):
    """A linear head on features: none (``body`` False) or one linear layer of its own (the
    fixed part of ANIL). With MSE the support loss is quadratic in the head."""

    features_then_classifier = True

    def __init__(self, body: bool):
        super().__init__()
        self.features = nn.Linear(5, 4) if body else nn.Flatten()
        self.classifier = nn.Linear(4 if body else 5, 3)

    def forward(self, x):
        return self.classifier(self.features(x))


def _tasks(n_tasks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"support_x": torch.randn(n_tasks, 6, 5, generator=g, dtype=torch.float64),
            "support_y": torch.arange(3).repeat(2).expand(n_tasks, 6).clone(),
            "query_x": torch.randn(n_tasks, 9, 5, generator=g, dtype=torch.float64),
            "query_y": torch.arange(3).repeat(3).expand(n_tasks, 9).clone()}


def _model(body: bool):
    torch.manual_seed(1)
    return LinearHead(body).double()


def _exact_gradient(model, tasks, adapted_names):
    """The meta-gradient of the mean query CE at phi* = argmin L_s + (LAM/2)||phi - theta||^2,
    phi* taken by one exact Newton step (the support loss is quadratic in the adapted head),
    differentiated by autograd through torch.linalg.solve."""
    model.zero_grad()
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in adapted_names]
    theta = torch.cat([params[n].reshape(-1) for n in adapted_names])

    def with_flat(vec):
        out, start = dict(params), 0
        for name, shape in zip(adapted_names, shapes):
            out[name] = vec[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return out

    def logits(vec, x):
        return torch.func.functional_call(model, with_flat(vec), (x,))
    total = 0
    n_tasks = tasks["support_x"].shape[0]
    for t in range(n_tasks):
        def support(vec):
            return INNER_LOSSES["mse"](logits(vec, tasks["support_x"][t]), tasks["support_y"][t])
        hessian = torch.autograd.functional.hessian(support, theta, create_graph=True)
        grad = torch.autograd.grad(support(theta), theta, create_graph=True)[0]
        system = hessian + LAM * torch.eye(theta.numel(), dtype=theta.dtype)
        phi = theta - torch.linalg.solve(system, grad)
        total = total + cross_entropy(logits(phi, tasks["query_x"][t]), tasks["query_y"][t])
    (total / n_tasks).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _implicit_gradient(model, tasks, algorithm, adapt=None, cg_steps=30):
    model.zero_grad()
    spec = InnerLoopSpec(algorithm, inner_steps=150, inner_lr=0.3, inner_loss="mse",
                         vectorize=False, adapt=adapt, meta_gradient="implicit",
                         proximal_lambda=LAM, cg_steps=cg_steps)
    meta_backward(model, tasks, spec, workers=1)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close(got, want):
    for name in want:
        error = (got[name] - want[name]).norm() / want[name].norm()
        assert error < 1e-4, (name, error.item())


@pytest.mark.parametrize("algorithm,body,adapt", [
    ("maml", False, None),  # every parameter adapts (the head on fixed inputs)
    ("anil", True, None),   # the body's dependence through the support features
    ("maml", False, ("classifier.weight",)),  # a fixed bias inside the support loss
])
def test_implicit_meta_gradient_equals_the_closed_form(algorithm, body, adapt):
    model, tasks = _model(body), _tasks()
    names = [n for n, _ in model.named_parameters()
             if (n.startswith("classifier.") if algorithm == "anil" else True)
             and (adapt is None or n in adapt)]
    want = _exact_gradient(model, tasks, names)
    got = _implicit_gradient(model, tasks, algorithm, adapt)
    _assert_close(got, want)


def test_too_few_cg_steps_are_not_the_closed_form():
    """The test above is not vacuous: one CG step leaves a visible error."""
    model, tasks = _model(False), _tasks()
    want = _exact_gradient(model, tasks, [n for n, _ in model.named_parameters()])
    got = _implicit_gradient(model, tasks, "maml", cg_steps=1)
    assert (got["classifier.weight"] - want["classifier.weight"]).norm() > 1e-6


def test_conjugate_gradient_solves_a_small_spd_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    matrix = a @ a.T + 0.5 * torch.eye(7, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    split = [b[:3], b[3:]]  # one vector in two blocks, as parameters come

    def matvec(v):
        out = matrix @ torch.cat(v)
        return [out[:3], out[3:]]
    x = torch.cat(conjugate_gradient(matvec, split, steps=7))
    assert torch.allclose(x, torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-10)


def test_the_proximal_inner_loop_keeps_no_graph_through_its_steps():
    """The adapted parameters of the implicit path come from a graph-free solve: their only
    history is the implicit node, whatever the number of inner steps."""
    model, tasks = _model(False), _tasks(1)
    spec = InnerLoopSpec("maml", 20, 0.3, inner_loss="mse", meta_gradient="implicit",
                         proximal_lambda=LAM)
    plan, lrs = _plan(model, spec, "cpu", False)
    params = dict(model.named_parameters())
    task = _task_forward(model, params, plan)
    adaptation = _adapt_task(task, lrs, plan, tasks["support_x"][0], tasks["support_y"][0])
    weight = adaptation.params["classifier.weight"]
    assert type(weight.grad_fn).__name__ == "ImplicitSolutionBackward"
    assert weight.grad_fn.next_functions[-1][0] is None or all(
        type(f).__name__ == "AccumulateGrad" for f, _ in weight.grad_fn.next_functions if f)


def test_evaluation_adapts_with_the_proximal_term():
    """A large lambda holds the adapted head near theta: evaluation differs from the plain
    inner loop and equals ``adapt`` with the proximal term."""
    model, tasks = _model(False), _tasks(1)
    plain = InnerLoopSpec("maml", 10, 0.3, inner_loss="mse", vectorize=False)
    proximal = plain.replace(meta_gradient="implicit", proximal_lambda=1.0)
    a = evaluate_tasks(model, tasks, plain, workers=1)["query_loss"]
    b = evaluate_tasks(model, tasks, proximal, workers=1)["query_loss"]
    params = {n: p.detach() for n, p in model.named_parameters()}
    adaptation = adapt(lambda p, x: torch.func.functional_call(model, p, (x,)), params,
                       tasks["support_x"][0], tasks["support_y"][0], adapted_names=list(params),
                       lrs={n: 0.3 for n in params}, steps=10, inner_loss="mse",
                       first_order=True, proximal=1.0)
    logits = torch.func.functional_call(model, adaptation.params, (tasks["query_x"][0],))
    want = cross_entropy(logits, tasks["query_y"][0]).float()
    assert a != b and torch.allclose(b, want, rtol=1e-6)


@pytest.mark.parametrize("changes,words", [
    ({"proximal_lambda": 0.0}, "positive"), ({"cg_steps": 0}, "cg_steps"),
    ({"vectorize": True}, "vectorize"), ({"checkpoint": "steps"}, "checkpoint"),
])
def test_the_spec_refuses_what_implicit_cannot_do(changes, words):
    with pytest.raises(ValueError, match=words):
        InnerLoopSpec("maml", 1, 0.4, meta_gradient="implicit", **changes)


def _config(*overrides):
    return load_config(ROOT / "configs" / "cnn_maml.yaml", list(overrides))


@pytest.mark.parametrize("overrides,line", [
    (("algorithm.meta_gradient=implicit", "algorithm.proximal_lambda=0"),
     r"`algorithm.proximal_lambda` = 0.* must be positive"),
    (("algorithm.meta_gradient=implicit", "algorithm.cg_steps=0"),
     r"`algorithm.cg_steps` = 0 must be positive"),
    (("algorithm.meta_gradient=implicit", "algorithm.cg_damping=-1"),
     r"`algorithm.cg_damping` = -1.* must not be negative"),
    (("algorithm.meta_gradient=implicit", "algorithm.vectorize=true"),
     r"implicit .* does not take `algorithm.vectorize`"),
    (("algorithm.meta_gradient=implicit", "algorithm.learn_inner_lr=per_step"),
     r"does not take `algorithm.learn_inner_lr`"),
    (("algorithm.meta_gradient=hessian",), r"`algorithm.meta_gradient`.*unrolled, implicit"),
])
def test_the_config_refuses_what_implicit_cannot_do_in_one_line(overrides, line):
    with pytest.raises(ConfigError, match=line) as error:
        _config(*overrides)
    assert "\n" not in str(error.value)


class _OneProcess:
    def all_reduce_mean_(self, tensor):
        return tensor


def test_the_trainer_step_takes_the_implicit_meta_gradient_of_its_config():

    cfg = _config("algorithm.meta_gradient=implicit", "algorithm.proximal_lambda=2.0",
                  "algorithm.cg_steps=3", "algorithm.inner_steps=4", "algorithm.inner_lr=0.1")
    tasks = make_tasks(dtype=torch.float32, jitter=0.1)
    grads = []
    for spec in (None, InnerLoopSpec.from_config(cfg, precision="no", step=0),
                 InnerLoopSpec.from_config(cfg, precision="no", step=0).replace(
                     meta_gradient="unrolled")):
        torch.manual_seed(0)
        model = build_model("cnn", 3, width=4, blocks=2, image_size=8)
        if spec is None:
            state = TrainState(model, learner_from_config(cfg, model),
                               torch.optim.SGD(model.parameters(), lr=0.0), InnerLossScaler(),
                               InnerLossScaler(), step=0)
            train_step(state, tasks, cfg, _OneProcess(), "no", acc_before=False)
        else:
            meta_backward(model, tasks, spec)  # the trainer's workers: the same sums in order
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    trainer, implicit, unrolled = grads
    assert torch.allclose(trainer, implicit, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(trainer, unrolled, rtol=1e-2)
    evaluation = InnerLoopSpec.from_config(cfg, precision="no", evaluation=True)
    assert (evaluation.meta_gradient, evaluation.proximal_lambda) == ("implicit", 2.0)


def test_the_imaml_omniglot_config_loads_with_the_reference_values():
    cfg = load_config(ROOT / "configs" / "imaml" / "cnn_5w1s.yaml")
    algo = cfg.algorithm
    assert (algo.meta_gradient, algo.proximal_lambda, algo.cg_steps, algo.cg_damping,
            algo.inner_steps, algo.inner_lr) == ("implicit", 2.0, 5, 1.0, 16, 0.1)
    assert (cfg.task.n_way, cfg.task.k_shot, cfg.data.split) == (5, 1, "vinyals")


@pytest.mark.integration
def test_a_tiny_implicit_run_trains_validates_and_tests(packed, tmp_path):
    run_dir = tmp_path / "run"
    run("train.py", ["--config", str(ROOT / "configs" / "cnn_maml.yaml"), "--run-dir",
                     str(run_dir), f"data.shards={packed('futurama')}", "task.k_shot=1",
                     "task.q_query=2", "train.meta_batch_size=2", "model.width=8",
                     "train.steps=3", "train.eval_every=2", "train.checkpoint_every=3",
                     "train.log_every=1", "eval.episodes=4", "eval.val_episodes=4",
                     "eval.batch_size=4", "eval.inner_steps=2", "logging.wandb=false",
                     "algorithm.meta_gradient=implicit", "algorithm.inner_steps=3",
                     "algorithm.inner_lr=0.1", "algorithm.cg_steps=2"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert [r["step"] for r in rows if "val/acc" in r] == [2]
    assert [r["step"] for r in rows if "test/acc" in r] == [3]
