"""launch/precision_check.py (fsl_dist.bench.precision_check): the float64 comparison it prints
is right where the answer is known (float32 matches float64 on a small model; moving weights by
zero changes nothing), its support-loss trace matches an inner step written out by hand, and a
bad run folder is a clear error."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fsl_dist.bench import precision_check
from fsl_dist.models import build_model

from launching import ROOT

SMALL = ["model.width=8", "task.k_shot=1", "task.q_query=2"]


@pytest.fixture(scope="module")
def shards(packed):
    return packed("futurama")


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if re.match(r"\| \d", line)]


def test_float32_matches_float64_and_every_column_is_a_cosine(shards, capsys):
    status = precision_check.main(["--config", str(ROOT / "configs" / "cnn_maml.yaml"),
                                   "--tasks", "2", "--inner-steps", "1,2",
                                   f"data.shards={shards}", *SMALL])
    assert status == 0
    rows = table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["1", "2"]
    for steps, norm, float32, bf16, nearby, trace in rows:
        assert float(norm) > 0
        assert len(trace.split(" → ")) == int(steps) + 1
        cosine, relative = (float(v) for v in float32.split(" / "))
        assert cosine >= 0.99999 and relative < 1e-4, (steps, float32)
        for cell in (bf16, nearby):
            cosine, relative = (float(v) for v in cell.split(" / "))
            assert -1.0 <= cosine <= 1.0 and relative >= 0.0


def test_moving_weights_by_zero_leaves_them_and_moving_them_is_relative():
    model = torch.nn.Linear(3, 2).double()
    same = precision_check.moved(model, 0.0, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    shifted = precision_check.moved(model, 2.0 ** -9, seed=1)
    for a, b in zip(model.parameters(), shifted.parameters()):
        ratio = (b / a - 1).abs()
        assert 0 < ratio.max() < 2.0 ** -9 * 6  # N(0, 1) draws beyond 6 sigma do not happen here


def test_a_missing_run_folder_is_a_clear_error(tmp_path, capsys):
    assert precision_check.main(["--run-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_support_loss_trace_matches_one_inner_step_by_hand():
    torch.manual_seed(0)
    model = build_model("cnn", n_way=3, width=4).double()
    tasks = {"support_x": torch.rand(2, 6, 1, 28, 28, dtype=torch.float64),
             "support_y": torch.arange(3).repeat(2).expand(2, -1)}
    cfg = SimpleNamespace(algorithm=SimpleNamespace(name="boil", inner_loss="ce", adapt=None))
    before, after = precision_check.support_losses(model, 0.3, tasks, cfg, steps=1)

    expected_before, expected_after = [], []
    for x, y in zip(tasks["support_x"], tasks["support_y"]):
        loss = F.cross_entropy(model(x), y)
        expected_before.append(loss.item())
        body = [p for n, p in model.named_parameters() if n.startswith("features.")]
        grads = dict(zip([n for n, _ in model.named_parameters() if n.startswith("features.")],
                         torch.autograd.grad(loss, body)))
        stepped = {n: p - 0.3 * grads[n] if n in grads else p for n, p in model.named_parameters()}
        expected_after.append(
            F.cross_entropy(torch.func.functional_call(model, stepped, (x,)), y).item())
    assert before == pytest.approx(sum(expected_before) / 2, rel=1e-12)
    assert after == pytest.approx(sum(expected_after) / 2, rel=1e-12)
    assert after != pytest.approx(before, rel=1e-6)  # BOIL's body step changed the loss
