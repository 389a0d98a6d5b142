"""A command's resident set over time (printed when it moves by 8 MiB or more), with the times of
its output lines, polled every 5 ms (log section 21); run from the project's root:

    python docs/benchmarks/2026-12-05-memory-plan/exit_rss.py python launch/train.py --config ...
"""

import os
import subprocess
import sys
import threading
import time


def status_mib(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
    return {key: int(fields[key].split()[0]) // 1024 for key in ("VmRSS", "VmHWM")}


def main(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    start, events = time.monotonic(), []

    def read():
        for line in process.stdout:
            events.append((time.monotonic() - start, "LINE " + line.rstrip()[:110]))
    threading.Thread(target=read, daemon=True).start()
    last = 0
    while process.poll() is None:
        try:
            mib = status_mib(process.pid)
        except (OSError, KeyError):  # exiting: a zombie's status has no VmRSS
            break
        if abs(mib["VmRSS"] - last) >= 8:
            events.append((time.monotonic() - start,
                           f"rss {mib['VmRSS']} MiB hwm {mib['VmHWM']} MiB"))
            last = mib["VmRSS"]
        time.sleep(0.005)
    process.wait()
    time.sleep(0.2)
    for at, event in sorted(events):
        print(f"{at:7.3f} {event}")
    print("exit status", process.returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
