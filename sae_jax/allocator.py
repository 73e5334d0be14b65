"""Keep freed memory in the process, so a train step does not page-fault its temporaries in.

XLA:CPU allocates each step's temporaries (one to three GB at d=384, F=24576, batch 4096)
with malloc and frees them when the step ends. glibc serves an allocation that large with a
fresh `mmap` and returns it with `munmap`, so every step faults every page in again
(~540,000 minor faults a step, and the kernel zeroing them: a third of the sparse TopK
step's CPU time). With mmap off for large blocks and heap trimming off, freed blocks stay
in the heap and the next step reuses them: 0 faults a step once the heap has grown to fit.

The cost: the process keeps its peak heap until it exits, which is what a training process
wants. Set through `mallopt` (the in-process equivalent of `MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=-1`); a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
_TUNED = False


def keep_freed_memory() -> bool:
    """Tells glibc malloc to serve large blocks from the heap and never hand freed memory
    back to the OS; True once applied (in this or an earlier call), False without glibc."""
    global _TUNED
    if _TUNED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 is the largest size_t: never trim. mallopt returns 1 on success.
    _TUNED = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    return _TUNED


def minor_faults() -> int:
    """Minor page faults of this process so far (each is a fresh page the kernel mapped
    and zeroed): unlike a timing, independent of what else the machine runs."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
