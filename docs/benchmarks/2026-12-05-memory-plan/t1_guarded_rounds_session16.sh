#!/bin/bash
# One-thread budget rows with the guarded tcmalloc search (lightest first, the rest capped).
. ~/.cache/fsl_dist/venv/bin/activate
export PYTHONPATH=/work/main OMP_NUM_THREADS=1
date -u; uptime
python /work/main/launch/bench.py --models cnn resnet --algorithms maml --tasks 5w1s15q \
  --inner-steps 1 --meta-batches 8 32 --methods torchopt learn2learn "loop, memory plan" \
  --steps 3 --warmup 1 --rounds 3 --no-float64-check --threads 1 \
  --json ./t1_guarded_rounds_session16.json
date -u; uptime
