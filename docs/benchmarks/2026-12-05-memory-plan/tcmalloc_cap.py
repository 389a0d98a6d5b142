"""Section 30 of the log: can RLIMIT_DATA stop allocations under tcmalloc, cleanly and
recoverably? 300 MiB freed and handed back first, then a data limit ROOM MiB above VmData.

    LD_PRELOAD=.../libtcmalloc_minimal.so.4 TCMALLOC_RELEASE_RATE=0 \
        FSL_DIST_LD_PRELOAD=.../libtcmalloc_minimal.so.4 PYTHONPATH=/work/main \
        python tcmalloc_cap.py ROOM
"""

import ctypes
import resource
import sys

import torch

from fsl_dist.cpu_malloc import loaded_tcmalloc, release_free_memory
from fsl_dist.memory_plan import status_bytes

MiB = 2**20
get = ctypes.CDLL(None).MallocExtension_GetNumericProperty
get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]


def prop(name):
    value = ctypes.c_size_t()
    return value.value / MiB if get(name.encode(), ctypes.byref(value)) else None


print("allocator", loaded_tcmalloc())
held = [torch.ones(30 * MiB // 4) for _ in range(10)]  # 300 MiB, then freed: mapped free pages
del held
release_free_memory()
print("unmapped MiB", prop("tcmalloc.pageheap_unmapped_bytes"),
      "free MiB", prop("tcmalloc.pageheap_free_bytes"))
with open("/proc/self/clear_refs", "w") as marks:
    marks.write("5")
rss0, data0 = status_bytes("VmRSS"), status_bytes("VmData")
soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
room = int(sys.argv[1]) * MiB
resource.setrlimit(resource.RLIMIT_DATA, (int(data0 + room), hard))
got = []
try:
    for _ in range(100):
        got.append(torch.ones(50 * MiB // 4))
    print("not stopped")
except RuntimeError as error:
    print("stopped after", len(got), "x 50 MiB:", str(error).splitlines()[0][:120])
peak = status_bytes("VmHWM")
resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
grew = (status_bytes("VmData") - data0) / MiB
print(f"peak above start {(peak - rss0) / MiB:.0f} MiB with room {room / MiB:.0f} "
      f"(VmData grew {grew:.0f})")
del got
release_free_memory()
again = torch.ones(800 * MiB // 4)
print("after: 800 MiB ok", float(again[0]))
