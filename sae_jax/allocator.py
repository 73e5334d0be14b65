"""Keep freed memory in the process, so a train step does not page-fault its temporaries in.

XLA:CPU allocates each step's temporaries (one to three GB at d=384, F=24576, batch 4096)
with malloc and frees them when the step ends. glibc serves an allocation that large with a
fresh `mmap` and returns it with `munmap`, so every step faults every page in again
(~540,000 minor faults a step, and the kernel zeroing them: a third of the sparse TopK
step's CPU time). With mmap off for large blocks and heap trimming off, freed blocks stay
in the heap and the next step reuses them: 0 faults a step once the heap has grown to fit.
That takes one malloc arena (`one_arena`): XLA's worker threads allocate the temporaries,
and a thread's own arena can only get a block over 64 MB from mmap. A thread keeps the
arena it first allocated from, so `one_arena` must run before XLA starts its threads (before
the first `jax.devices()`); later it only affects threads started afterwards.

The cost: the process keeps its peak heap until it exits, which is what a training process
wants. Set through `mallopt` (the in-process equivalent of `MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=-1`); a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
_TUNED = False


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's `mallopt` for each (parameter, value); False without glibc or on a refusal."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)


def one_arena() -> bool:
    """Every thread that allocates from now on shares the main malloc arena."""
    return _mallopt((M_ARENA_MAX, 1))


def keep_freed_memory() -> bool:
    """One arena, large blocks from the heap, and freed memory never handed back to the OS;
    True once applied (in this or an earlier call), False without glibc."""
    global _TUNED
    # -1 is the largest size_t: never trim.
    _TUNED = _TUNED or (one_arena() and _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
    return _TUNED


def minor_faults() -> int:
    """Minor page faults of this process so far (each is a fresh page the kernel mapped
    and zeroed): unlike a timing, independent of what else the machine runs."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
