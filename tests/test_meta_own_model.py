"""A model of your own: any nn.Module, with a rule for which parameters adapt (a name prefix or
a predicate), through the meta API and, built from its import path, through the trainer,
evaluation and prediction."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
import yaml
from faults import BY_KEY
from torch import nn
from torch.func import functional_call

from fsl_dist.config import ConfigError, load_config
from fsl_dist.meta import (
    InnerLoopSpec,
    default_vectorize,
    inner_parameter_names,
    meta_backward,
    meta_loss,
)
from fsl_dist.models import BatchStatNorm2d, ModelImportError, build_model
from fsl_dist.predict import load_model

from launching import ROOT, run
from meta_helpers import make_tasks

# The model of the tests, also written out as a module for the trainer to import. Its names
# are not features/classifier, its forward does more than head(body(x)), and it holds a
# parameter outside both parts (a learned logit scale).
MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self, n_way, in_channels=1, image_size=8):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(),
                                         nn.MaxPool2d(2))
            self.fc = nn.Linear(4 * (image_size // 2) ** 2, n_way)
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.scale * self.fc(self.encoder(x).flatten(1))


    def build(n_way, in_channels, image_size):
        return TinyNet(n_way, in_channels, image_size)
''')
namespace: dict = {}
exec(compile(MODEL_SOURCE, "own_model", "exec"), namespace)  # noqa: S102 (the source above)
TinyNet = namespace["TinyNet"]


def reference_meta_gradient(model, tasks, adapted, lr, steps):
    """Second-order MAML written out with torch.autograd on the whole model: ``adapted`` names
    take ``steps`` steps of size ``lr`` on the support loss, the rest stay fixed."""
    params = dict(model.named_parameters())
    total = 0.0
    for t in range(tasks["support_x"].shape[0]):
        fast = dict(params)
        for _ in range(steps):
            logits = functional_call(model, fast, (tasks["support_x"][t],))
            loss = F.cross_entropy(logits, tasks["support_y"][t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=True)
            fast.update({n: fast[n] - lr * g for n, g in zip(adapted, grads)})
        query = functional_call(model, fast, (tasks["query_x"][t],))
        total = total + F.cross_entropy(query, tasks["query_y"][t])
    mean = total / tasks["support_x"].shape[0]
    return torch.autograd.grad(mean, list(params.values()))


def api_meta_gradient(model, tasks, spec):
    model.zero_grad()
    meta_backward(model, tasks, spec, workers=1)
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def model_and_tasks():
    torch.manual_seed(0)
    return TinyNet(3).double(), make_tasks(tasks=2, n_way=3, k_shot=2, n_query=2, jitter=0.1)


ENCODER = ["encoder.0.weight", "encoder.0.bias"]
RULES = {  # adapt rule -> the names it adapts
    "maml, no rule: every parameter": (None, ["scale", "encoder.0.weight", "encoder.0.bias",
                                               "fc.weight", "fc.bias"]),
    "a prefix (BOIL's rule on this model)": ("encoder", ENCODER),
    "prefixes": (("encoder.0.weight", "fc"), ["encoder.0.weight", "fc.weight", "fc.bias"]),
    "a predicate": (lambda name: name.endswith("bias"), ["encoder.0.bias", "fc.bias"]),
}


@pytest.mark.parametrize("rule", RULES, ids=list(RULES))
def test_meta_gradient_of_an_own_model_equals_the_written_out_one(model_and_tasks, rule):
    model, tasks = model_and_tasks
    adapt, adapted = RULES[rule]
    spec = InnerLoopSpec("maml", inner_steps=2, inner_lr=0.3, adapt=adapt, vectorize=False)
    assert inner_parameter_names("maml", model, adapt) == adapted
    expected = reference_meta_gradient(model, tasks, adapted, 0.3, 2)
    for got, want in zip(api_meta_gradient(model, tasks, spec), expected):
        torch.testing.assert_close(got, want)
    loss, _ = meta_loss(model, tasks, spec)  # the graph-holding path agrees as well
    for got, want in zip(torch.autograd.grad(loss, list(model.parameters())), expected):
        torch.testing.assert_close(got, want)


def test_vmap_path_takes_an_own_model_too(model_and_tasks):
    model, tasks = model_and_tasks
    spec = InnerLoopSpec("boil", inner_steps=1, inner_lr=0.3, adapt="encoder")
    loop = api_meta_gradient(model, tasks, spec.replace(vectorize=False))
    for got, want in zip(api_meta_gradient(model, tasks, spec.replace(vectorize=True)), loop):
        torch.testing.assert_close(got, want)


def test_step_sizes_by_prefix_of_an_own_model(model_and_tasks):
    model, tasks = model_and_tasks
    by_prefix = {"encoder": 0.3, "fc": 0.1, "scale": 0.2}
    spec = InnerLoopSpec("maml", inner_steps=1, inner_lr=by_prefix, vectorize=False)
    same = InnerLoopSpec("maml", inner_steps=1, inner_lr=0.3, adapt="encoder", vectorize=False)
    only_encoder = {"encoder": 0.3, "fc": 0.0, "scale": 0.0}
    for got, want in zip(api_meta_gradient(model, tasks, spec.replace(inner_lr=only_encoder)),
                         api_meta_gradient(model, tasks, same)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="no step size for the adapted parameter"):
        meta_loss(model, tasks, spec.replace(inner_lr={"encoder": 0.3}))


def test_boil_without_a_rule_says_how_to_name_the_adapted_parameters(model_and_tasks):
    model, tasks = model_and_tasks
    with pytest.raises(ValueError, match="features.*say which adapt with adapt="):
        meta_loss(model, tasks, InnerLoopSpec("boil", inner_steps=1, inner_lr=0.3))
    with pytest.raises(ValueError, match="selects none"):
        meta_loss(model, tasks, InnerLoopSpec("maml", 1, 0.3, adapt="decoder"))


def test_an_own_model_checkpoints_its_inner_steps_and_refuses_blocks(model_and_tasks):
    """checkpoint='steps' wraps any forward, so an own model keeps its meta-gradient with it;
    'blocks' needs the built-in models' body of blocks, and says so."""
    model, tasks = model_and_tasks
    plain = InnerLoopSpec("maml", inner_steps=2, inner_lr=0.3, adapt="encoder", vectorize=False)
    expected = api_meta_gradient(model, tasks, plain)
    for got, want in zip(api_meta_gradient(model, tasks, plain.replace(checkpoint="steps")),
                         expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="takes checkpoint='steps'"):
        api_meta_gradient(model, tasks, plain.replace(checkpoint="blocks"))
    with pytest.raises(ConfigError, match="a model of your own"):
        load_config(ROOT / "configs" / "cnn_maml.yaml",
                    ["model.name=own_model:build", "algorithm.checkpoint=blocks"])


def test_an_import_path_that_does_not_import_is_one_config_error():
    with pytest.raises(ModelImportError, match="cannot import no_such_module"):
        build_model("no_such_module:build", 5)
    with pytest.raises(ModelImportError, match="has no nothing_here"):
        build_model("json:nothing_here", 5)


# ------------------------------------------------------------------ through the trainer

TINY = ["task.n_way=3", "task.k_shot=1", "task.q_query=2", "train.meta_batch_size=2",
        "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2", "train.log_every=1",
        "eval.episodes=4", "eval.val_episodes=2", "eval.batch_size=4", "eval.inner_steps=1",
        "logging.wandb=false", "model.name=own_model:build", "algorithm.name=boil",
        "algorithm.adapt=[encoder]", "algorithm.inner_lr=0.3"]


@pytest.fixture(scope="module")
def own_model_run(packed, tmp_path_factory):
    """A 2-step run of the test's model, built by the trainer from its import path, the module
    in the folder the trainer starts in (a user's project folder)."""
    project = tmp_path_factory.mktemp("project")
    (project / "own_model.py").write_text(MODEL_SOURCE)
    run("train.py", ["--config", str(ROOT / "configs" / "cnn_maml.yaml"),
                     "--run-dir", str(project / "run"), f"data.shards={packed('futurama')}",
                     *TINY], cwd=project)
    return project


@pytest.mark.integration
def test_trainer_builds_evaluates_and_exports_an_own_model(own_model_run, monkeypatch):
    run_dir = own_model_run / "run"
    description = yaml.safe_load((run_dir / "model.yaml").read_text())
    assert description["model"]["name"] == "own_model:build"
    assert description["algorithm"]["adapt"] == ["encoder"]
    assert json.loads((run_dir / "eval.json").read_text())["episodes"] == 4
    result = run("evaluate.py", ["--run-dir", str(run_dir), "--episodes", "4"], cwd=own_model_run)
    assert "%" in result.stdout + result.stderr
    monkeypatch.syspath_prepend(str(own_model_run))
    trained = load_model(run_dir, device="cpu")  # prediction rebuilds it from model.yaml
    spec = trained.learner.spec(precision="no", evaluation=True)
    assert type(trained.model).__name__ == "TinyNet" and spec.adapt == ("encoder",)


@pytest.mark.integration
def test_evaluating_an_own_model_where_it_cannot_be_imported_is_one_line(own_model_run):
    fault = BY_KEY["evaluate_model_import"]
    before = sorted(p.name for p in (own_model_run / "run").iterdir())
    result = run("evaluate.py", ["--run-dir", str(own_model_run / "run"), "--episodes", "4"],
                 check=False)  # from the repository: own_model.py is not there
    assert result.returncode == fault.code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model own_model:build: ") and fault.seen in last, last
    assert sorted(p.name for p in (own_model_run / "run").iterdir()) == before


class NormNet(nn.Module):
    """A model of one's own with batch norm: torch's, or fsl_dist's BatchStatNorm2d."""

    def __init__(self, norm):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm(4), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.encoder(x))


def test_batch_stat_norm_gives_the_same_meta_gradient_through_vmap_as_the_loop():
    torch.manual_seed(0)
    model = NormNet(BatchStatNorm2d).double()
    tasks = make_tasks(tasks=2, n_way=3, k_shot=2, n_query=2, jitter=0.1)
    spec = InnerLoopSpec("boil", inner_steps=2, inner_lr=0.5, adapt="encoder")
    loop = api_meta_gradient(model, tasks, spec.replace(vectorize=False))
    for got, want in zip(api_meta_gradient(model, tasks, spec.replace(vectorize=True)), loop):
        torch.testing.assert_close(got, want)


def test_torch_batch_norm_keeps_to_the_loop_where_vmap_would_be_wrong():
    model = NormNet(lambda c: nn.BatchNorm2d(c, track_running_stats=False)).double()
    tasks = make_tasks(tasks=2, n_way=3, k_shot=2, n_query=2, jitter=0.1)
    assert default_vectorize("cuda", model) is False
    with pytest.raises(ValueError, match="wrong second-order gradients.*BatchStatNorm2d"):
        meta_loss(model, tasks, InnerLoopSpec("maml", 1, 0.3, vectorize=True))
