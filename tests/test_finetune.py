"""The frozen-backbone evaluation methods (fsl_dist/finetune.py) against hand-computed
references: nearest centroid on a hand-worked episode, and the Baseline and Baseline++ heads
against the reference code's loop written with torch's own layers and optimiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fsl_dist.finetune import (
    FinetuneSpec,
    centroid_accuracy,
    episode_generators,
    finetune_accuracy,
    head_logits,
    train_heads,
)


class Identity(nn.Module):
    """A 'backbone' whose features are the pixels: the hand computations can read them."""

    def __init__(self):
        super().__init__()
        self.features = nn.Flatten()


def task(points: list, labels: list) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(points, dtype=torch.float32).view(1, len(points), 1, 1, -1)
    return x, torch.tensor([labels])


def test_nearest_centroid_matches_the_hand_computed_episode():
    # centroids (1, 0) and (0, 3); queries: (1, 1) is 1 from the first, 5 from the second;
    # (0, 2.5) is 7.25 and 0.25 away; (3, 3) is 13 and 9 away, so the second (its label is 0)
    support_x, support_y = task([[0, 0], [2, 0], [0, 4], [0, 2]], [0, 0, 1, 1])
    query_x, query_y = task([[1, 1], [0, 2.5], [3, 3]], [0, 1, 0])
    tasks = {"support_x": support_x, "support_y": support_y, "query_x": query_x,
             "query_y": query_y}
    assert centroid_accuracy(Identity(), tasks).tolist() == pytest.approx([2 / 3])


def reference_head(spec: FinetuneSpec, support, labels, n_way: int, seed: int, episode: int):
    """Chen et al.'s loop (baselinefinetune.py) with torch's layers and torch.optim.SGD, drawing
    its random numbers from the episode's generator in the order fsl_dist does."""
    generator = episode_generators(seed, range(episode, episode + 1), "cpu")[0]
    dim = support.shape[1]
    bound = dim ** -0.5
    weight = (torch.rand(n_way, dim, generator=generator) * 2 - 1) * bound
    if spec.head == "linear":
        head = nn.Linear(dim, n_way)
        bias = (torch.rand(n_way, generator=generator) * 2 - 1) * bound
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        forward = head
    else:  # distLinear: WeightNorm over a bias-free linear layer, on normalised features
        linear = nn.Linear(dim, n_way, bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight)
        head = nn.utils.parametrizations.weight_norm(linear, dim=0)

        def forward(x):
            return spec.scale * head(x / (x.norm(dim=1, keepdim=True) + 1e-5))
    optimizer = torch.optim.SGD(head.parameters(), lr=spec.lr, momentum=spec.momentum,
                                dampening=spec.dampening, weight_decay=spec.weight_decay)
    for _ in range(spec.epochs):
        order = torch.randperm(len(support), generator=generator)
        for start in range(0, len(support), spec.batch_size):
            picked = order[start:start + spec.batch_size]
            optimizer.zero_grad()
            nn.functional.cross_entropy(forward(support[picked]), labels[picked]).backward()
            optimizer.step()
    return forward


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_new_heads_train_as_the_reference_code_with_torch_sgd(head):
    """Two episodes trained together (each its own head and random numbers) give the heads
    of the reference loop run on each alone: 3-way 3-shot, so a mini-batch of 4 leaves a
    last one of 1 in every epoch."""
    spec = FinetuneSpec(head=head, epochs=7)
    torch.manual_seed(0)
    support = torch.randn(2, 9, 6, dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(3).expand(2, 9)
    query = torch.randn(2, 5, 6, dtype=torch.float64)
    trained = train_heads(spec, support, labels, 3, episode_generators(11, range(4, 6), "cpu"))
    ours = head_logits(spec, trained, query)
    for t, episode in enumerate((4, 5)):
        reference = reference_head(spec, support[t].float(), labels[t], 3, 11, episode)
        with torch.no_grad():
            expected = reference(query[t].float()).double()
        torch.testing.assert_close(ours[t], expected, rtol=1e-5, atol=1e-6)


def test_a_head_depends_on_its_episode_not_on_the_batch_it_trains_in():
    spec = FinetuneSpec(head="linear", epochs=3)
    torch.manual_seed(1)
    x = torch.rand(3, 4, 1, 2, 3)
    tasks = {"support_x": x, "support_y": torch.tensor([[0, 0, 1, 1]] * 3),
             "query_x": torch.rand(3, 6, 1, 2, 3),
             "query_y": torch.tensor([[0, 1, 0, 1, 0, 1]] * 3)}
    together = finetune_accuracy(Identity(), tasks, spec, seed=5, episodes=range(10, 13))
    alone = [finetune_accuracy(Identity(), {k: v[i:i + 1] for k, v in tasks.items()}, spec,
                               seed=5, episodes=range(10 + i, 11 + i)) for i in range(3)]
    assert together.tolist() == torch.cat(alone).tolist()
