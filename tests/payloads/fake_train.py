"""A stand-in for launch/train.py with the same exit contract, for testing the launch and
preemption plumbing without training: records its arguments and environment in the run folder,
runs FAKE_TRAIN_SECONDS (default 30) unless SIGUSR1/SIGTERM arrives first, then writes a
"checkpoint" and exits 75 (stopped, resumable) or writes done.json and exits 0."""

import json
import os
import signal
import sys
import time
from pathlib import Path

args = sys.argv[1:]
run_dir = Path(args[args.index("--run-dir") + 1])
run_dir.mkdir(parents=True, exist_ok=True)
rank = os.environ.get("RANK", "0")
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
with open(run_dir / f"started-{rank}.jsonl", "a") as fh:
    fh.write(json.dumps({"argv": args, "pid": os.getpid(), "rank": rank,
                         "world_size": os.environ.get("WORLD_SIZE"),
                         "restart": os.environ.get("SLURM_RESTART_COUNT", "0")}) + "\n")
deadline = time.monotonic() + float(os.environ.get("FAKE_TRAIN_SECONDS", "30"))
while time.monotonic() < deadline and not stop:
    time.sleep(0.05)
if stop:
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "step-00000003.pt").write_text("fake")
    print(f"fake_train rank {rank}: signal {stop[0]}, checkpoint written", flush=True)
    sys.exit(75)
(run_dir / "done.json").write_text(json.dumps({"rank": rank}))
print(f"fake_train rank {rank}: done", flush=True)
