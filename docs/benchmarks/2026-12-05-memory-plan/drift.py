"""What the process holds before and after each probe (RSS, anonymous and file pages, glibc heap)

    PYTHONPATH=/work/main OMP_NUM_THREADS=1 python drift.py cnn|resnet META_BATCH none:defaults,none:tuned,...

One process, one malloc arena as plan_memory sets, loop one task at a time, the probes in the
order given (checkpoint level : allocator). Log section 12; output in drift_session5.log.
"""
import ctypes, gc, sys
import torch
from fsl_dist.bench.cases import synthetic_tasks
from fsl_dist.bench.planned import case_config
from fsl_dist.cpu_malloc import release_free_memory, single_arena, _libc
from fsl_dist.distributed import Distributed
from fsl_dist.learners import learner_from_config
from fsl_dist.memory_plan import Plan, Prober, status_bytes
from fsl_dist.meta.precision import InnerLossScaler
from fsl_dist.models import build_model
from fsl_dist.trainer import TrainState
MIB = 2**20
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = _libc(); libc.mallinfo2.restype = MI
def report(tag):
    gc.collect(); release_free_memory()
    m = libc.mallinfo2()
    print(f"{tag:28s} rss {status_bytes('VmRSS')/MIB:7.1f} anon {status_bytes('RssAnon')/MIB:7.1f} file {status_bytes('RssFile')/MIB:7.1f} heap {m.arena/MIB:7.1f} inuse {m.uordblks/MIB:7.1f} free {m.fordblks/MIB:7.1f} mmap {m.hblkhd/MIB:6.1f} ({m.hblks})", flush=True)
model_name = sys.argv[1]; mb = int(sys.argv[2])
torch.set_num_threads(1); torch.manual_seed(0)
case = {"model": model_name, "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15, "inner_steps": 1, "meta_batch": mb}
model = build_model(model_name, 5); tasks = synthetic_tasks(case, "cpu"); cfg = case_config(case, 10.0)
state = TrainState(model, learner_from_config(cfg, model), torch.optim.Adam(model.parameters(), 1e-3), InnerLossScaler(), InnerLossScaler())
single_arena(); report("start")
prober = Prober(state, tasks, cfg, "no", Distributed())
order = [m.split(":") for m in sys.argv[3].split(",")]
for ck, malloc in order:
    plan = Plan(False, 1, ck, malloc)
    p = prober([plan])[0]
    print(f"  {plan.name}: before {p.before/MIB:.1f} peak {p.peak/MIB:.1f} {p.seconds:.2f}s")
    report(f"after {ck}/{malloc}")
