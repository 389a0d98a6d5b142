#!/bin/bash
# Two-thread budget rows with the default train.cpu_allocator (auto), two runs back to back.
. ~/.cache/fsl_dist/venv/bin/activate
export OMP_NUM_THREADS=2 PYTHONPATH=/work/main
for n in 1 2; do
  date -u; uptime
  python /work/main/launch/bench.py --models cnn resnet --algorithms maml --tasks 5w1s15q \
    --inner-steps 1 --meta-batches 8 32 --methods torchopt learn2learn "loop, memory plan" \
    --steps 6 --warmup 2 --rounds 3 --no-float64-check --threads 2 \
    --json ./t2_auto_rounds${n}_session16.json
  date -u; uptime
done
