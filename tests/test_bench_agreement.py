"""launch/bench.py's methods (fsl_dist.bench.peers) compute the same meta-gradient: fsl_dist's
vmap path and the peers learn2learn, higher and TorchOpt against fsl_dist's loop path, float32,
tiny models, MAML, BOIL and ANIL at two inner steps. A peer that is not installed
(launch/install_bench_peers.sh) is skipped with the reason, or fails the test with
FSL_REQUIRE_PEERS=1 (as in CI)."""

import copy
import os

import pytest
import torch

from fsl_dist.bench import peers
from fsl_dist.bench.measure import meta_gradient
from fsl_dist.models import build_model
from fsl_dist.numerics import agreement

from meta_helpers import make_tasks

TOLERANCE = 1e-5  # largest |g - g_loop| relative to the largest |g_loop|, float32
OTHERS = ["vmap", "loop, no feature reuse", "loop, serial", "loop, meta_loss + backward",
          *peers.PEERS]


def tiny(name):
    torch.manual_seed(0)
    if name == "cnn":
        return build_model("cnn", 3, width=8, blocks=2, image_size=8)
    return build_model("resnet", 3, widths=(4, 8), image_size=8)


@pytest.fixture(scope="module")
def tasks():
    # jitter: no exact ties in max-pool windows, so every method routes gradients alike
    return make_tasks(tasks=3, n_way=3, k_shot=1, n_query=2, size=8, dtype=torch.float32,
                      jitter=0.05)


@pytest.mark.parametrize("method", OTHERS)
@pytest.mark.parametrize("algorithm", ["maml", "boil", "anil"])
@pytest.mark.parametrize("model_name", ["cnn", "resnet"])
def test_meta_gradient_matches_loop(model_name, algorithm, method, tasks):
    case = {"model": model_name, "algorithm": algorithm, "inner_steps": 2,
            "n_way": 3, "k_shot": 1, "n_query": 2, "meta_batch": 3}
    if not peers.METHODS[method][0](case):
        pytest.skip(f"{method} applies to ANIL only")
    base = tiny(model_name)

    def gradient(name):
        model = copy.deepcopy(base)
        try:
            backward = peers.METHODS[name][1](model, tasks, case)
        except peers.Unavailable as why:
            if os.environ.get("FSL_REQUIRE_PEERS") == "1":
                pytest.fail(f"{why}; FSL_REQUIRE_PEERS=1: install them with "
                            "`bash launch/install_bench_peers.sh`")
            pytest.skip(str(why))
        return meta_gradient(backward, model)

    reference, grad = gradient("loop"), gradient(method)
    assert reference.abs().max() > 0
    result = agreement(grad, reference)
    assert result["max_rel_diff"] <= TOLERANCE, result


@pytest.mark.parametrize("algorithm", ["maml", "boil", "anil"])
def test_flop_reference_computes_the_same_meta_gradient(algorithm, tasks):
    """The plain-autograd reference whose FLOP the benchmark counts is the same math."""
    case = {"model": "cnn", "algorithm": algorithm, "inner_steps": 2,
            "n_way": 3, "k_shot": 1, "n_query": 2, "meta_batch": 3}
    base = tiny("cnn")
    grads = {}
    for name, factory in [("loop", peers.METHODS["loop"][1]), ("reference", peers.REFERENCE)]:
        model = copy.deepcopy(base)
        grads[name] = meta_gradient(factory(model, tasks, case), model)
    assert agreement(grads["reference"], grads["loop"])["max_rel_diff"] <= TOLERANCE
