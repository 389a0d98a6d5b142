"""A ProtoNet written outside fsl_dist's trainer (issue 41's reference): fsl_dist's shards and
Conv-4 `features` body, 60-way 1-shot 5-query episodes, Adam 1e-3 halved every 2000 episodes;
support and query embedded in one forward pass (as Snell et al.'s code does). Single thread.

    python reference_protonet.py train --shards S --out DIR --at 240 480 960
    python reference_protonet.py eval --shards S --weights DIR/cpu-240.pt --seeds 1234 1235 1236
"""

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from fsl_dist.data.episodes import TaskSpec, make_tasks
from fsl_dist.data.shards import load_class_pool
from fsl_dist.evaluate import confidence_interval
from fsl_dist.models import build_model


def embed_logits(body, support, query, n_way, separate=False):
    # one pass: batch norm over support and query together; separate: each set alone (fsl_dist)
    z = (torch.cat([body(support), body(query)]) if separate
         else body(torch.cat([support, query]))).flatten(1)
    protos = z[:len(support)].reshape(n_way, -1, z.shape[1]).mean(1)  # support is class-major
    return -torch.cdist(z[len(support):], protos).pow(2)


def train(args):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pool = load_class_pool(args.shards, "train")
    images = pool.images.float() / 255.0  # [I, 1, 28, 28]
    turned = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    offsets, counts = pool.offsets, pool.counts
    body = build_model("cnn", args.way, width=64).features
    opt = torch.optim.Adam(body.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2000, gamma=0.5)
    shots = args.shot + args.query
    y = torch.arange(args.way).repeat_interleave(args.query)
    pending, step = list(args.at), 0
    while pending:
        picks = rng.choice(len(counts) * 4, args.way, replace=False)  # (class, quarter turn)
        classes, turns = picks % len(counts), picks // len(counts)
        rows = np.stack([offsets[c] + rng.choice(counts[c], shots, replace=False)
                         for c in classes])
        x = turned[torch.from_numpy(turns)[:, None], torch.from_numpy(rows)]  # [N, K+Q, 1, H, W]
        support = x[:, :args.shot].reshape(-1, *x.shape[2:])
        query = x[:, args.shot:].reshape(-1, *x.shape[2:])
        logits = embed_logits(body, support, query, args.way)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        cpu = time.process_time()
        if step % 100 == 0:
            acc = (logits.argmax(1) == y).float().mean().item()
            print(f"step {step} cpu {cpu:.1f} loss {loss.item():.4f} acc {acc:.4f}", flush=True)
        if cpu >= pending[0]:
            torch.save({"body": body.state_dict(), "step": step, "cpu": cpu},
                       f"{args.out}/cpu-{pending[0]}.pt")
            print(f"saved cpu-{pending[0]}.pt step {step} cpu {cpu:.2f}", flush=True)
            pending.pop(0)


@torch.no_grad()
def evaluate(args):
    body = build_model("cnn", args.way, width=64).features
    saved = torch.load(args.weights)
    body.load_state_dict(saved["body"])
    body.eval()
    spec = TaskSpec(args.way, args.shot, args.query, rotate=False)
    results = []
    for seed in args.seeds:  # fsl_dist's test episodes: episode i is batch(0, [i]) of the seed
        tasks = make_tasks(args.shards, "test", spec, seed=seed)
        accs = []
        for i in range(args.episodes):
            t = tasks.batch(0, range(i, i + 1))
            order = t["support_y"][0].argsort(stable=True)  # class-major support for the means
            logits = embed_logits(body, t["support_x"][0][order], t["query_x"][0], args.way,
                                  args.separate_bn)
            accs.append((logits.argmax(1) == t["query_y"][0]).float().mean())
        r = confidence_interval(torch.stack(accs))
        print(f"seed {seed}: {r['mean']:.2f} +- {r['ci95']:.2f} "
              f"({args.episodes} episodes)", flush=True)
        results.append({"seed": seed, **r})
    means = [r["mean"] for r in results]
    print(json.dumps({"weights": args.weights, "step": saved["step"], "cpu": saved["cpu"],
                      "seed_means": means, "mean": float(np.mean(means)), "per_seed": results}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("train", "eval"))
    p.add_argument("--shards", required=True)
    p.add_argument("--out")
    p.add_argument("--weights")
    p.add_argument("--at", type=float, nargs="+", default=[240, 480, 960])
    p.add_argument("--way", type=int, default=60)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[1234])
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--separate-bn", action="store_true", help="eval: embed support, query apart")
    a = p.parse_args()
    torch.set_num_threads(1)
    train(a) if a.mode == "train" else evaluate(a)
