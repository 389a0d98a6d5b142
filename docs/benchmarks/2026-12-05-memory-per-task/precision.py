# Usage: PYTHONPATH=. OMP_NUM_THREADS=1 python THIS WIDTH SHOT QUERY STEPS binary|jitter [INNER_LR]
"""Why blocks' float32 meta-gradient differs from none's by more than 1e-6 on the benchmark's
ResNet-12 task: compare both with float64 (the exact value to ~1e-14) and with none's own
sensitivity to a 1-ulp perturbation of its parameters."""
import sys

import torch

from fsl_dist.bench.cases import synthetic_tasks
from fsl_dist.meta import InnerLoopSpec, meta_backward
from fsl_dist.models import build_model

width, shot, query, steps = (int(a) for a in sys.argv[1:5])
images = sys.argv[5]  # binary (the benchmark's) or jitter (plus 10% uniform noise)
lr = float(sys.argv[6]) if len(sys.argv) > 6 else 0.4
torch.set_num_threads(1)
case = {"n_way": 5, "k_shot": shot, "n_query": query, "meta_batch": 1, "image_size": 84,
        "channels": 3}
tasks32 = synthetic_tasks(case, torch.device("cpu"))
if images == "jitter":
    g = torch.Generator().manual_seed(1)
    for k in ("support_x", "query_x"):
        tasks32[k] = 0.9 * tasks32[k] + 0.1 * torch.rand(tasks32[k].shape, generator=g)


def grad(level, dtype, nudge=0.0):
    torch.manual_seed(0)
    model = build_model("resnet12", 5, width=width, in_channels=3, image_size=84).to(dtype)
    if nudge:  # every parameter times (1 + nudge * N(0,1)): a few ulps of float32
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + nudge * torch.randn(p.shape, generator=g, dtype=dtype))
    tasks = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tasks32.items()}
    spec = InnerLoopSpec("maml", steps, lr, vectorize=False, checkpoint=level)
    meta_backward(model, tasks, spec, acc_before=False, workers=1)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


exact = grad("none", torch.float64)
g = {lv: grad(lv, torch.float32) for lv in ("none", "steps", "blocks")}
nudged = grad("none", torch.float32, nudge=1.2e-7)
print(f"ResNet-12 width {width}, 84x84, 5w{shot}s{query}q, {steps} steps, inner lr {lr}, "
      f"{images} images")
print(f"  float64 blocks vs float64 none: {rel(grad('blocks', torch.float64), exact):.2e}")
for lv in ("none", "steps", "blocks"):
    print(f"  float32 {lv:6s} vs float64 none: {rel(g[lv], exact):.3e}")
print(f"  float32 blocks vs float32 none: {rel(g['blocks'], g['none']):.2e}")
print(f"  float32 steps  vs float32 none: {rel(g['steps'], g['none']):.2e}")
print(f"  float32 none with parameters nudged by 1 ulp vs float32 none: "
      f"{rel(nudged, g['none']):.2e}")
nudged64 = grad("none", torch.float64, nudge=1.2e-7)
print(f"  float64 none with parameters nudged the same way vs float64 none: "
      f"{rel(nudged64, exact):.2e}")
