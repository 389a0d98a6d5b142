#!/usr/bin/env bash
# One prepared GPU session, about 9 minutes on one card (issues 6 and 7):
#  (1) launch/bench.py --device cuda: fsl_dist's paths against learn2learn, higher and TorchOpt,
#      Conv-4 and ResNet, MAML, 5-way 1-shot 15-query, 1 inner step, meta-batch 32 (BENCH_S s);
#  (2) the issue-7 runs side by side on the one GPU, each stopped by SIGTERM after BUDGET s
#      (a clean stop with a checkpoint): the four Futurama systems and the standard-Omniglot
#      configs in configs/vinyals/;
#  (3) their 600-episode test evaluations with launch/evaluate.py, and a summary.
# Needs: shards/omniglot-futurama and shards/omniglot-vinyals packed (launch/pack.py); optional
# WHEELS_DIR (wheels to install offline, e.g. webdataset) and PEERS_DIR (a site-packages folder
# holding learn2learn, higher, torchopt). Results land in $OUT (default ./gpu_out).
#   OUT=gpu_out BENCH_S=150 BUDGET=240 bash launch/gpu_session.sh
set -uo pipefail
OUT=$(realpath -m "${OUT:-gpu_out}"); mkdir -p "$OUT"  # absolute: the script changes folder later
T0=$(date +%s)
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
[ -d "${WHEELS_DIR:-}" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS_DIR"/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD${PEERS_DIR:+:$PEERS_DIR}
{ python3 -V; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee $OUT/machine.txt
if ! python3 -c "import learn2learn" > $OUT/l2l_import.txt 2>&1; then
  # learn2learn's package __init__ imports its vision/gym/text modules (scipy, ...); load its own
  # algorithms/maml.py and utils without that __init__ and say so in the report.
  mkdir -p /tmp/shim/learn2learn
  cat > /tmp/shim/learn2learn/__init__.py <<'PY'
"""Device-only: learn2learn 0.2.0's algorithms/maml.py and utils, without the package __init__."""
import os, sys, types
_real = os.path.join(os.environ["PEERS"], "learn2learn")
__path__ = [_real]
__version__ = "0.2.0 (algorithms.maml and utils only; package __init__ skipped)"
algorithms = types.ModuleType("learn2learn.algorithms")
algorithms.__path__ = [os.path.join(_real, "algorithms")]
sys.modules["learn2learn.algorithms"] = algorithms
from .algorithms.maml import MAML  # noqa: E402
algorithms.MAML = MAML
PY
  export PEERS=${PEERS_DIR:-/nonexistent} PYTHONPATH=/tmp/shim:$PYTHONPATH
  echo "learn2learn: full import failed (see l2l_import.txt), shim used" | tee -a $OUT/machine.txt
fi
for m in learn2learn higher torchopt; do python3 -c "import $m; print('$m', $m.__version__)" 2>&1 | tail -1; done | tee -a $OUT/machine.txt

# (1) bench: Conv-4 and ResNet, MAML, 5-way 1-shot 15-query, 1 inner step, meta-batch 32
timeout ${BENCH_S:-170} python3 launch/bench.py --device cuda --models cnn resnet --algorithms maml \
  --inner-steps 1 --meta-batches 32 --steps 10 --warmup 2 \
  --methods vmap learn2learn higher torchopt "default, bf16" loop \
  --json $OUT/bench_cuda.json > $OUT/bench_cuda.md 2> $OUT/bench_cuda.err
echo "bench rc=$? at $(( $(date +%s) - T0 )) s"; grep '^| ' $OUT/bench_cuda.err | tail -12

# (2) training, all runs at once on the one GPU, each stopped by SIGTERM after BUDGET s
BUDGET=${BUDGET:-250}
# A folder of its own: step (3) walks every run in it and deletes their checkpoints, which must
# never reach runs this script did not start.
RUNS=$(mktemp -d /tmp/fsl_dist-gpu-runs.XXXXXX)
run() {  # name config overrides...
  local name=$1 config=$2; shift 2
  OMP_NUM_THREADS=2 timeout -s TERM $BUDGET python3 launch/train.py --config $config \
    --run-dir $RUNS/$name logging.wandb=false train.steps=100000 "$@" > $RUNS/$name.train.log 2>&1
  echo "$name train rc=$?"
}
run v_cnn_maml_5w1s configs/vinyals/cnn_maml_5w1s.yaml train.eval_every=250 &
run v_cnn_maml_20w1s configs/vinyals/cnn_maml_20w1s.yaml &
run v_resnet_boil_5w1s configs/vinyals/resnet_boil_5w1s.yaml &
run v_resnet_boil_20w1s configs/vinyals/resnet_boil_20w1s.yaml &
for sys in cnn_maml cnn_boil resnet_maml resnet_boil; do
  run f_$sys configs/$sys.yaml train.meta_batch_size=32 train.eval_every=500 train.checkpoint_every=100000 &
done
wait
echo "training done at $(( $(date +%s) - T0 )) s"
# (3) 600 test episodes each (ResNet_MAML also with 1 inner step at test)
for d in $RUNS/*/; do
  n=$(basename $d)
  ( OMP_NUM_THREADS=2 python3 launch/evaluate.py --run-dir $d --episodes 600 --out eval.json > $RUNS/$n.eval.log 2>&1
    echo "$n eval rc=$?" ) &
done
( OMP_NUM_THREADS=2 python3 launch/evaluate.py --run-dir $RUNS/f_resnet_maml --episodes 600 --inner-steps 1 --out eval_1step.json > $RUNS/f_resnet_maml.eval1.log 2>&1; echo "resnet_maml 1-step eval rc=$?" ) &
wait
cd "$RUNS"
for d in */; do
  n=${d%/}
  python3 - "$n" <<'PY'
import json, sys
n = sys.argv[1]
rows = [json.loads(l) for l in open(f"{n}/metrics.jsonl")]
steps = max(r["step"] for r in rows)
el = max(r.get("perf/elapsed_s", 0) for r in rows)
val = [(r["step"], r["val/acc"]) for r in rows if "val/acc" in r]
try:
    ev = json.load(open(f"{n}/eval.json")); test = f"{ev['mean']:.2f} +- {ev['ci95']:.2f}"
except Exception as e:
    test = f"no eval ({e})"
print(f"{n}: steps {steps} elapsed {el:.0f}s test {test} val {val[-4:]}")
PY
  rm -rf "$n/checkpoints"  # written by the run above, in $RUNS
done | tee $OUT/summary.txt
tar czf $OUT/runs.tgz --exclude='*.safetensors' .
echo "total $(( $(date +%s) - T0 )) s"
