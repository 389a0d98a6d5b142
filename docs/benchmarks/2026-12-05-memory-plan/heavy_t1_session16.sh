#!/bin/bash
# A 20-way, 12-inner-step Conv-4 (width 64, 15 queries) on one thread under tcmalloc (auto):
# the peak of the whole training process (VmHWM polled from outside: peak_of.py) against the budget, before
# (4d77143: the anchor's probe uncapped) and after (the lightest first, the rest capped).
. ~/.cache/fsl_dist/venv/bin/activate
S=${SHARDS:?the futurama shard set}
A="--config /work/main/configs/cnn_maml.yaml data.shards=$S task.k_shot=1 train.meta_batch_size=2 train.steps=2 train.checkpoint_every=2 train.eval_every=2 train.log_every=1 eval.episodes=4 eval.val_episodes=2 eval.batch_size=1 eval.inner_steps=1 logging.wandb=false model.width=64 task.q_query=15 algorithm.inner_steps=12 task.n_way=20 train.cpu_threads=1"
date -u
for code in /tmp/wt_old /work/main; do
  for b in 1.3 1.38; do
    rm -rf /tmp/hv/x
    echo "== $code budget $b"
    PYTHONPATH=$code python ./peak_of.py python $code/launch/train.py $A --run-dir /tmp/hv/x train.memory_budget_gb=$b
    [ -f /tmp/hv/x/run.json ] && python -c "
import json
for p in json.load(open('/tmp/hv/x/run.json'))['memory_plan']['probes']: print('   ', p['plan'], p['peak_gb'], 'stopped' if p['stopped_at_budget'] else '')"
  done
done
date -u
