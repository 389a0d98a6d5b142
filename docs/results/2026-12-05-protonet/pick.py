"""The checkpoints bracketing CPU-time points, from cputime.py's log of a fsl_dist run: the CPU
time logged at the poll (once a second) that first saw each checkpoint file.

    python pick.py fsl_cpu.log 240 480 960
"""

import re
import sys


def checkpoint_cpu(log: str) -> list[tuple[int, float]]:
    found = []
    for line in open(log):
        m = re.match(r"wall \S+ cpu (\S+) load \S+ new (\S+)", line)
        if m:
            for name in m.group(2).split(","):
                step = re.match(r"step-(\d+)\.pt$", name)
                if step:
                    found.append((int(step.group(1)), float(m.group(1))))
    return found


if __name__ == "__main__":
    points = checkpoint_cpu(sys.argv[1])
    for target in map(float, sys.argv[2:]):
        before = [p for p in points if p[1] <= target]
        after = [p for p in points if p[1] > target]
        print(f"{target:g} s: last at or before: {before[-1] if before else None}; "
              f"first after: {after[0] if after else None}")
