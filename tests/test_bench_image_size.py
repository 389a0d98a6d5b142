"""The benchmark's cases at another image size and channel count (84x84 RGB): the synthetic
tasks have that shape and the model built for the case takes them."""

import pytest
import torch

from fsl_dist.bench.cases import cases, model_label, model_options, synthetic_tasks
from fsl_dist.models import build_model


def test_default_cases_keep_their_keys():
    # saved runs of the 28x28 grid match their cases by these keys (resume, report)
    assert set(cases(quick=True)[0]) == {"model", "algorithm", "n_way", "k_shot", "n_query",
                                         "inner_steps", "meta_batch"}
    case = cases(quick=True)[0]
    assert synthetic_tasks(case, "cpu")["support_x"].shape == (8, 5, 1, 28, 28)
    assert model_label(case) == "cnn"


@pytest.mark.parametrize("model, width", [("cnn", 4), ("resnet12", 2)])
def test_rgb84_tasks_fit_the_case_model(model, width):
    (case,) = cases(quick=True, models=(model,), algorithms=("maml",), meta_batches=(2,),
                    image_size=84, channels=3, width=width)
    tasks = synthetic_tasks(case, "cpu")
    assert tasks["support_x"].shape == (2, 5, 3, 84, 84)
    assert tasks["query_x"].shape == (2, 75, 3, 84, 84)
    assert tasks["query_y"].shape == (2, 75)
    net = build_model(case["model"], case["n_way"], **model_options(case))
    with torch.no_grad():
        logits = net(tasks["support_x"][0])
    assert logits.shape == (5, 5)
    assert model_label(case) == f"{model}-{width} 84x84x3"
