#!/bin/bash
# Section 28 of the log: interleaved processes (heap_high_water.py, one task at a time, 5 timed
# steps): fsl_dist as the budget rows run it (one arena, tuned, start tunables) and under tcmalloc,
# the peers as shipped and learn2learn under tcmalloc. Run from this folder.
. ~/.cache/fsl_dist/venv/bin/activate
export PYTHONPATH=/work/main OMP_NUM_THREADS=2
T=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
TUN=glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0
date -u; uptime
for row in "cnn 8 3" "cnn 32 2" "resnet 8 3" "resnet 32 2"; do
  set -- $row
  for r in $(seq $3); do
    GLIBC_TUNABLES=$TUN python heap_high_water.py $1 ckpt:none 2 $2 tuned 5 no 2>&1 | tail -1 | sed "s/^/r$r fsl-glibc-tuned /"
    LD_PRELOAD=$T python heap_high_water.py $1 ckpt:none 2 $2 no 5 no 2>&1 | tail -1 | sed "s/^/r$r fsl-tcmalloc /"
    python heap_high_water.py $1 learn2learn 2 $2 no 5 no 2>&1 | tail -1 | sed "s/^/r$r l2l-shipped /"
    python heap_high_water.py $1 torchopt 2 $2 no 5 no 2>&1 | tail -1 | sed "s/^/r$r torchopt-shipped /"
    LD_PRELOAD=$T python heap_high_water.py $1 learn2learn 2 $2 no 5 no 2>&1 | tail -1 | sed "s/^/r$r l2l-tcmalloc /"
  done
done
date -u
