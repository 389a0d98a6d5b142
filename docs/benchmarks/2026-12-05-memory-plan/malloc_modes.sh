#!/bin/bash
# Peak above start and CPU per step of one fsl_dist row per glibc malloc mode, fresh processes.
cd /work/main && . ~/.cache/fsl_dist/venv/bin/activate
export PYTHONPATH=/work/main OMP_NUM_THREADS=1
model=${1:-cnn}; method=${2:-loop, serial}; mb=${3:-32}
spec=$(python - "$model" "$method" "$mb" <<'PY'
import json, sys
case = {"model": sys.argv[1], "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
        "inner_steps": 1, "meta_batch": int(sys.argv[3])}
print(json.dumps({"device": "cpu", "threads": 1, "case": case, "method": sys.argv[2],
                  "warmup": 1, "steps": 3}))
PY
)
declare -A MODES=(
  [fixed128k]="MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 MALLOC_TOP_PAD_=131072"
  [glibc_adaptive]="MALLOC_PERTURB_=0"
  [emul32m_trim64m]="MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=67108864"
  [emul32m_trim8m]="MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=8388608"
  [tuned]=""
)
for mode in ${MODELIST:-fixed128k glibc_adaptive emul32m_trim64m emul32m_trim8m tuned}; do
  out=$(env ${MODES[$mode]} /usr/bin/time -f "user %U sys %S" python -m fsl_dist.bench --row "$spec" 2>&1)
  echo "$mode $(echo "$out" | grep "^{" | tail -1 | python -c 'import json,sys; r=json.loads(sys.stdin.read()); print("peak_mib %.1f cpu_s_per_step %.2f s_per_step %.2f" % (r["peak_mem_mib"], r["cpu_s_per_step"], r["s_per_step"]))' 2>/dev/null) $(echo "$out" | grep '^user')"
done
