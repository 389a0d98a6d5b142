"""Section 16: what a data-segment cap (RLIMIT_DATA) does to a process, measured in three parts.

Written against ``capped_probe.diff`` applied to main at 12f5bc8 (``capped_at`` and
``out_of_memory`` in fsl_dist/memory_plan.py); main has both since section 17. One intra-op
thread.

    python capped_probe.py onednn    # a oneDNN kernel made under the cap, then new ones
    python capped_probe.py holes     # free heap chunks a stopped allocation loop leaves
    python capped_probe.py holes --own-thread
    python capped_probe.py meta      # Conv-4 meta-batch-32 meta-gradients refused midway, in a
                                     # thread of their own, as the probe ran them; where holes
                                     # stay, the in-use blocks at the top of the heap, named
    python capped_probe.py rounds [--hold-accumulators]
                                     # 24 such refusals, the heap's free MiB after each; with
                                     # the parameters' AccumulateGrad nodes held meanwhile
"""

import ctypes
import gc
import sys
import threading

import torch

from fsl_dist import cpu_malloc
from fsl_dist.bench.cases import model_options, synthetic_tasks
from fsl_dist.bench.peers import METHODS
from fsl_dist.memory_plan import capped_at, status_bytes
from fsl_dist.models import build_model

MiB = 2**20


def state() -> str:
    return (f"rss {status_bytes('VmRSS') / MiB:.1f} data {status_bytes('VmData') / MiB:.1f} "
            f"free {cpu_malloc.heap_free_bytes() / MiB:.1f} MiB")


def onednn() -> None:
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x, y = torch.randn(75, 64, 28, 28), torch.randn(10, 64, 14, 14)
    conv(y)  # a kernel for this shape, made without the cap
    try:
        with capped_at(status_bytes("VmRSS") - 2**30, 0.0):  # no room at all
            conv(x)
    except RuntimeError as error:
        print("capped:", str(error)[:80])
    for name, t in (("same shape", x), ("shape made before", y),
                    ("new shape", torch.randn(5, 64, 28, 28))):
        try:
            conv(t)
            print(name, "ok")
        except RuntimeError as error:
            print(name, "FAILS:", str(error)[:60])


def allocate_until_refused(autograd: bool) -> None:
    held, weight = [], torch.randn(64, 64, requires_grad=True)
    try:
        with capped_at(status_bytes("VmRSS") + 100 * MiB, 0.0):
            while True:
                t = torch.ones(1_000_000 + 1000 * len(held))
                held.append((t * weight.sum()).relu() if autograd else t)
    except RuntimeError:
        pass


def holes(own_thread: bool) -> None:
    gc.collect()
    cpu_malloc.release_free_memory()
    print("start", state())
    for autograd in (False, True):
        for _ in range(2):
            if own_thread:
                thread = threading.Thread(target=allocate_until_refused, args=(autograd,))
                thread.start()
                thread.join()
            else:
                allocate_until_refused(autograd)
            gc.collect()
            cpu_malloc.release_free_memory()
            print("autograd" if autograd else "plain", "after the refusal", state())


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def top_of_heap(count: int = 8) -> list[str]:
    """The last ``count`` in-use chunks of glibc's main heap (walked from its start, one thread
    running), each with the symbol its first word points to (a C++ object's vtable names its
    class)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    start = next(int(line.split("-")[0], 16) for line in open("/proc/self/maps")
                 if line.rstrip().endswith("[heap]"))
    end, chunks, address = libc.sbrk(0), [], start
    while address < end - 16:
        size = ctypes.c_uint64.from_address(address + 8).value & ~7
        if size == 0:
            break
        chunks.append((address, size))
        address += size
    in_use = [(a, size) for (a, size), (b, _) in zip(chunks, chunks[1:])
              if ctypes.c_uint64.from_address(b + 8).value & 1]  # the next one's PREV_INUSE
    named = []
    for a, size in in_use[-count:]:
        info = _DlInfo()
        word = ctypes.c_uint64.from_address(a + 16).value
        found = libc.dladdr(ctypes.c_void_p(word), ctypes.byref(info)) and info.dli_sname
        named.append(f"{a - start:>11} {size:>9} {info.dli_sname.decode() if found else ''}")
    return named


def conv4_after_its_twin():
    """Conv-4 at meta-batch 32 and its meta-gradient, run once with glibc's defaults (the twin:
    kernels made, library code paged in), then the tuned allocator set."""
    case = {"model": "cnn", "algorithm": "maml", "n_way": 5, "k_shot": 1, "n_query": 15,
            "inner_steps": 1, "meta_batch": 32}
    model = build_model("cnn", 5, **model_options(case))
    step = METHODS["loop, serial"][1](model, synthetic_tasks(case, "cpu"), case)
    cpu_malloc.tune_cpu_malloc(False)
    step()
    model.zero_grad(set_to_none=True)
    cpu_malloc.tune_cpu_malloc(True)
    return model, step


def refuse_midway(model, step) -> None:
    """Two meta-gradients in a thread of its own under a cap that refuses the second midway
    (a step needs about 140 MiB), gradients cleared and garbage collected in that thread; the
    heap trimmed after."""
    def run():
        try:
            step()
            model.zero_grad(set_to_none=True)
            step()
        except RuntimeError:
            pass
        model.zero_grad(set_to_none=True)
        gc.collect()
    gc.collect()
    cpu_malloc.release_free_memory()
    thread = threading.Thread(target=run)
    thread.start()
    with capped_at(status_bytes("VmRSS") + 60 * MiB, 0.0):
        thread.join()
    gc.collect()
    cpu_malloc.release_free_memory()


def meta() -> None:
    model, step = conv4_after_its_twin()
    for _ in range(8):
        refuse_midway(model, step)
        print("meta-gradient after the refusal", state())
        if cpu_malloc.heap_free_bytes() > 30 * MiB:
            print("  in use at the top of the heap (offset, bytes, symbol of the first word):")
            print("\n".join("  " + line for line in top_of_heap()))


def rounds(hold_accumulators: bool) -> None:
    """A parameter keeps a weak reference to its AccumulateGrad node, which the step makes anew
    when the last graph's has gone; the node and its reference count are one block, freed only
    with the last weak reference. Held from before the cap, the nodes are not made again
    inside the step, at the top of the heap."""
    model, step = conv4_after_its_twin()
    free = []
    for _ in range(24):
        held = ([p.view_as(p).grad_fn.next_functions[0][0] for p in model.parameters()]
                if hold_accumulators else [])
        refuse_midway(model, step)
        del held
        free.append(f"{cpu_malloc.heap_free_bytes() / MiB:.1f}")
    print("accumulators held:" if hold_accumulators else "accumulators not held:",
          "heap free MiB after each refusal:", " ".join(free))


if __name__ == "__main__":
    torch.set_num_threads(1)
    cpu_malloc.single_arena()
    cpu_malloc.tune_cpu_malloc(True)
    if sys.argv[1] == "onednn":
        onednn()
    elif sys.argv[1] == "meta":
        meta()
    elif sys.argv[1] == "rounds":
        rounds("--hold-accumulators" in sys.argv)
    else:
        holes("--own-thread" in sys.argv)
