"""Section 17, point 6: can a probe step run in a forked copy of a process whose OpenMP pool
has run? On this machine (torch's libgomp, two threads) the child hangs at its first parallel
region; run it under a timeout:

    timeout 60 python fork_probe.py
"""

import os
import time

import torch

torch.set_num_threads(2)
images = torch.randn(64, 3, 28, 28)
conv = torch.nn.Conv2d(3, 64, 3)


def work() -> float:
    started = time.perf_counter()
    for _ in range(50):
        conv(images).relu().sum().backward()
    return time.perf_counter() - started


print("parent", work(), torch.get_num_threads(), flush=True)
for _ in range(3):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, f"{work():.3f} {torch.get_num_threads()}".encode())
        os._exit(0)
    os.close(write)
    started = time.time()
    answer = os.read(read, 100)
    _, status = os.waitpid(pid, 0)
    print("child", answer, status, time.time() - started, flush=True)
print("parent again", work())
