"""Few-shot evaluation of a frozen backbone: nearest centroid, and a new head trained on the
support set (Chen et al. 2019, "A Closer Look at Few-shot Classification": Baseline and
Baseline++).

Every method reads the features of the model's body (``model.features``); the body never
changes. Per episode, the support and the query set are each one forward, as the MAML family's
evaluation runs them (batch norm normalises with each set's own statistics).

- ``centroid``: each class's centroid is the mean support feature; a query goes to the nearest
  centroid in squared Euclidean distance (the validation of fsl-pretrain): ProtoNet's scoring at
  scale 1, computed by its functions (fsl_dist/learners/protonet.py).
- ``finetune-linear`` (Baseline): a new linear head ``W f + b``, trained on the support features.
- ``finetune-cosine`` (Baseline++): ``scale * g_j * cos(f, v_j)``, the weight norm's direction
  ``v_j`` and length ``g_j`` per class (the reference code's WeightNorm), ``scale`` fixed.

The heads train as the reference code trains them (``CloserLookFewShot/methods/
baselinefinetune.py``, ``backbone.distLinear``): 100 epochs over the support set in random
mini-batches of 4 (the last one smaller), SGD with lr 0.01, momentum 0.9, dampening 0.9 and
weight decay 0.001, cross-entropy; torch's default initialisation of a linear layer
(uniform in +-1/sqrt(features)); Baseline++'s scale 2 (its value for heads of at most 200
classes). The episodes of a batch train together, each with its own head and its own random
numbers, drawn from a generator seeded by (eval seed, episode): the result does not depend on
the number of processes or on how episodes are batched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsl_dist.learners.protonet import proto_logits, prototypes

METHODS = ("centroid", "finetune-linear", "finetune-cosine")
NORM_EPS = 1e-5  # the reference code's guard in ||f|| + eps


@dataclass(frozen=True)
class FinetuneSpec:
    """How a new head is trained on a support set (defaults: Chen et al. 2019's code)."""

    head: str = "linear"  # linear (Baseline) or cosine (Baseline++)
    epochs: int = 100
    batch_size: int = 4
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 0.001
    scale: float = 2.0  # cosine only

    def __post_init__(self):
        if self.head not in ("linear", "cosine"):
            raise ValueError(f"head must be linear or cosine, got {self.head!r}")


@dataclass
class FrozenBody:
    """A model without a few-shot learner around it (fsl-pretrain's): what the frozen-body
    methods read (``model``), and what the trainer's state asks of a learner (no learned state
    beside the model)."""

    model: nn.Module
    evaluation_steps: int = 0

    def extras(self) -> dict:
        return {}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def load_extras(self, states) -> None:
        return None


# ---------------------------------------------------------------- features


@torch.no_grad()
def episode_features(model, tasks: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(support [T, N*K, D], query [T, N*Q, D]) features of the body, in float32, each set of
    each task one forward; the model is in evaluation mode meanwhile (DropBlock off)."""
    was_training = model.training
    model.eval()
    try:
        support = [model.features(x) for x in tasks["support_x"]]
        query = [model.features(x) for x in tasks["query_x"]]
    finally:
        model.train(was_training)
    return torch.stack(support).float(), torch.stack(query).float()


def centroid_predictions(support, support_y, query, n_way: int) -> torch.Tensor:
    """[T, Q] class of the nearest centroid (squared Euclidean distance) of each query: the
    highest of ProtoNet's logits at scale 1, by its own functions, so that a pre-trained
    model's predictions (fsl-predict takes it as a ProtoNet model of scale 1) equal these."""
    return torch.stack([proto_logits(q, prototypes(s, y, n_way), 1.0).argmax(-1)
                        for s, y, q in zip(support, support_y, query)])


def n_way_of(tasks: dict) -> int:
    return int(tasks["support_y"].max()) + 1


def centroid_accuracy(model, tasks: dict) -> torch.Tensor:
    """[T] query accuracy of nearest-centroid classification on the body's features."""
    support, query = episode_features(model, tasks)
    predicted = centroid_predictions(support, tasks["support_y"], query, n_way_of(tasks))
    return (predicted == tasks["query_y"]).float().mean(1)


# ---------------------------------------------------------------- new heads


def episode_generators(seed: int, episodes: range, device) -> list[torch.Generator]:
    """One generator per episode, seeded by (seed, episode) alone."""
    out = []
    for episode in episodes:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed) * 1_000_003 + int(episode))
        out.append(generator)
    return out


def init_heads(spec: FinetuneSpec, tasks: int, n_way: int, dim: int,
               generators: list[torch.Generator]) -> dict:
    """Fresh heads, [T, N, D] weights (and [T, N] biases or lengths), as torch initialises a
    linear layer: uniform in +-1/sqrt(D); a cosine head's lengths start at its weights' norms
    (WeightNorm's initialisation)."""
    bound = 1.0 / math.sqrt(dim)
    weight = torch.stack([(torch.rand(n_way, dim, generator=g) * 2 - 1) * bound
                          for g in generators])
    if spec.head == "linear":
        bias = torch.stack([(torch.rand(n_way, generator=g) * 2 - 1) * bound for g in generators])
        return {"weight": weight, "bias": bias}
    return {"weight": weight, "length": weight.norm(dim=-1)}


def head_logits(spec: FinetuneSpec, head: dict, features: torch.Tensor) -> torch.Tensor:
    """[T, B, N] logits of ``features`` [T, B, D] under each task's head."""
    if spec.head == "linear":
        return features @ head["weight"].transpose(1, 2) + head["bias"][:, None, :]
    unit = features / (features.norm(dim=-1, keepdim=True) + NORM_EPS)
    direction = head["weight"] / head["weight"].norm(dim=-1, keepdim=True)
    return spec.scale * head["length"][:, None, :] * (unit @ direction.transpose(1, 2))


def sgd_step(params: dict, grads: dict, buffers: dict, spec: FinetuneSpec) -> None:
    """torch.optim.SGD's update (weight decay, momentum with dampening, no Nesterov), in place,
    on every task's head at once."""
    for name, p in params.items():
        grad = grads[name] + spec.weight_decay * p
        if name not in buffers:
            buffers[name] = grad.clone()  # torch: the first step takes the gradient undamped
        else:
            buffers[name].mul_(spec.momentum).add_(grad, alpha=1 - spec.dampening)
        p.sub_(spec.lr * buffers[name])


def train_heads(spec: FinetuneSpec, support: torch.Tensor, labels: torch.Tensor, n_way: int,
                generators: list[torch.Generator]) -> dict:
    """Heads trained on each task's support features [T, S, D] with labels [T, S]."""
    tasks, size, dim = support.shape
    head = init_heads(spec, tasks, n_way, dim, generators)
    head = {k: v.to(support.device, support.dtype) for k, v in head.items()}
    buffers: dict = {}
    rows = torch.arange(tasks, device=support.device)[:, None]
    for _ in range(spec.epochs):
        order = torch.stack([torch.randperm(size, generator=g) for g in generators])
        order = order.to(support.device)
        for start in range(0, size, spec.batch_size):
            picked = order[:, start:start + spec.batch_size]
            params = {k: v.requires_grad_(True) for k, v in head.items()}
            with torch.enable_grad():
                logits = head_logits(spec, params, support[rows, picked])
                # the sum over tasks of each task's mean: each head gets its own gradient
                loss = F.cross_entropy(logits.flatten(0, 1), labels[rows, picked].flatten(),
                                       reduction="none").view(tasks, -1).mean(1).sum()
                grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
            head = {k: v.detach() for k, v in params.items()}
            with torch.no_grad():
                sgd_step(head, grads, buffers, spec)
    return head


def finetune_accuracy(model, tasks: dict, spec: FinetuneSpec, seed: int,
                      episodes: range) -> torch.Tensor:
    """[T] query accuracy of a new head trained on each task's support features; task t is
    episode ``episodes[t]`` (its random numbers come from (``seed``, episode))."""
    support, query = episode_features(model, tasks)
    n_way = n_way_of(tasks)
    generators = episode_generators(seed, episodes, support.device)
    head = train_heads(spec, support, tasks["support_y"], n_way, generators)
    with torch.no_grad():
        predicted = head_logits(spec, head, query).argmax(-1)
    return (predicted == tasks["query_y"]).float().mean(1)


def method_score(method: str, model, seed: int):
    """``evaluate_episodes``' score function of ``method`` (one of ``METHODS``)."""
    if method == "centroid":
        return lambda tasks, episodes: {"acc": centroid_accuracy(model, tasks)}
    spec = FinetuneSpec(head=method.removeprefix("finetune-"))
    return lambda tasks, episodes: {"acc": finetune_accuracy(model, tasks, spec, seed,
                                                             episodes)}
