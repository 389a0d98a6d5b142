"""A command's resident set over time (printed when it moves by 8 MiB or more), with the times of
its output lines, polled every 5 ms (log section 21):

    python exit_rss.py python launch/train.py --config configs/cnn_maml.yaml ...
"""
import subprocess, sys, time, threading, os
cmd = sys.argv[1:]
env = dict(os.environ, PYTHONPATH="/work/main", PYTHONUNBUFFERED="1")
p = subprocess.Popen(cmd, cwd="/work/main", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
t0 = time.monotonic(); events = []
def read():
    for line in p.stdout:
        events.append((time.monotonic() - t0, "LINE " + line.rstrip()[:110]))
threading.Thread(target=read, daemon=True).start()
last = 0
while p.poll() is None:
    try:
        st = dict(l.split(":", 1) for l in open(f"/proc/{p.pid}/status").read().splitlines())
        rss = int(st["VmRSS"].split()[0]) // 1024; hwm = int(st["VmHWM"].split()[0]) // 1024
        thr = st["Threads"].strip()
        if abs(rss - last) >= 8:
            events.append((time.monotonic() - t0, f"rss {rss} MiB hwm {hwm} threads {thr}")); last = rss
    except Exception:
        pass
    time.sleep(0.005)
time.sleep(0.2)
for t, e in sorted(events): print(f"{t:7.3f} {e}")
print("rc", p.returncode)
