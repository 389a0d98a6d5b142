"""Run a command; print its exit code and the peak of its resident set over its whole life,
read from outside: VmHWM polled every 20 ms until it has exited (the process resets its own
mark before each probe, so GNU time's maxrss, taken at exit, misses earlier peaks).
    python peak_of.py COMMAND..."""
import subprocess
import sys
import time
from pathlib import Path

process = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
status, peak = Path(f"/proc/{process.pid}/status"), 0
while True:
    try:
        hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
    except OSError:
        hwm = []
    if not hwm:
        break
    peak = max(peak, int(hwm[0].split()[1]) * 1024)
    time.sleep(0.02)
out = process.stdout.read()
process.wait()
for line in out.splitlines():
    if line.startswith(("error", "memory plan")):
        print(line[:230])
print(f"exit {process.returncode}, peak {peak / 1e9:.4f} GB (from outside)")
