#!/bin/bash
# The budget rows with the guarded tcmalloc search (main at 4cbc1b5): two threads, then one.
. ~/.cache/fsl_dist/venv/bin/activate
export PYTHONPATH=/work/main
for t in 2 1; do
  date -u; uptime
  OMP_NUM_THREADS=$t python /work/main/launch/bench.py --models cnn resnet --algorithms maml \
    --tasks 5w1s15q --inner-steps 1 --meta-batches 8 32 \
    --methods torchopt learn2learn "loop, memory plan" --steps $((t == 2 ? 6 : 3)) \
    --warmup $((t == 2 ? 2 : 1)) --rounds 3 --no-float64-check --threads $t \
    --json ./t${t}_guarded_rounds_session16.json
  date -u; uptime
done
