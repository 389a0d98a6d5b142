"""Where float32 loses the meta-gradient on the benchmark task (ResNet-12 width 8, 84x84,
5w1s5q, binary images): the plain query gradient (no inner step), first order, second order."""
import torch

from fsl_dist.bench.cases import synthetic_tasks
from fsl_dist.meta import InnerLoopSpec, meta_backward
from fsl_dist.models import build_model

torch.set_num_threads(1)
case = {"n_way": 5, "k_shot": 1, "n_query": 5, "meta_batch": 1, "image_size": 84, "channels": 3}
tasks32 = synthetic_tasks(case, torch.device("cpu"))


def model_of(dtype):
    torch.manual_seed(0)
    return build_model("resnet12", 5, width=8, in_channels=3, image_size=84).to(dtype)


def plain(dtype):
    model = model_of(dtype)
    x, y = tasks32["query_x"][0].to(dtype), tasks32["query_y"][0]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).double(), model(x).double()


def meta(dtype, first_order):
    model = model_of(dtype)
    tasks = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tasks32.items()}
    meta_backward(model, tasks, InnerLoopSpec("maml", 1, 0.4, first_order=first_order,
                                              vectorize=False), acc_before=False, workers=1)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


(g32, out32), (g64, out64) = plain(torch.float32), plain(torch.float64)
print(f"logits of the query, float32 vs float64: {rel(out32, out64):.2e}")
print(f"query gradient, no inner step, float32 vs float64: {rel(g32, g64):.2e}")
print(f"meta-gradient 1 step first order, float32 vs float64: "
      f"{rel(meta(torch.float32, True), meta(torch.float64, True)):.2e}")
print(f"meta-gradient 1 step second order, float32 vs float64: "
      f"{rel(meta(torch.float32, False), meta(torch.float64, False)):.2e}")
