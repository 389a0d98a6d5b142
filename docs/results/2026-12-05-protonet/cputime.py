"""Run a command and log its CPU time (utime+stime of it and its descendants, from /proc) once
a second, with the load average and the checkpoints that have appeared in a folder; stop it
(SIGTERM: a background job ignores SIGINT) once its CPU time passes a limit.

    python cputime.py --log LOG --watch RUN/checkpoints --limit 990 -- python launch/train.py ...
"""

import argparse
import os
import signal
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def descendants(pid):
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            kids = open(f"/proc/{parent}/task/{parent}/children").read().split()
        except OSError:
            continue
        found += [int(k) for k in kids]
        frontier += [int(k) for k in kids]
    return found


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICK


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--watch", default=None, help="folder whose new entries are logged")
    parser.add_argument("--limit", type=float, default=None, help="CPU seconds, then stop")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.time()
    proc = subprocess.Popen(command)
    seen, cpu, stopping = set(), 0.0, False
    with open(args.log, "a") as log:
        log.write(f"# pid {proc.pid} command {' '.join(command)}\n")
        while proc.poll() is None:
            cpu = max(cpu, cpu_seconds(descendants(proc.pid)))
            load = open("/proc/loadavg").read().split()[0]
            new = []
            if args.watch and os.path.isdir(args.watch):
                new = sorted(set(os.listdir(args.watch)) - seen)
                seen.update(new)
            log.write(f"wall {time.time() - start:.1f} cpu {cpu:.2f} load {load}"
                      f"{' new ' + ','.join(new) if new else ''}\n")
            log.flush()
            if args.limit and cpu > args.limit and not stopping:
                proc.send_signal(signal.SIGTERM)
                stopping = True
            time.sleep(1.0)
        # children of an exited process are reaped: the last poll is the total
        log.write(f"# exit {proc.returncode} wall {time.time() - start:.1f} cpu>= {cpu:.2f}\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
