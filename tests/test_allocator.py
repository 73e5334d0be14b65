"""`allocator.keep_freed_memory`: freed large blocks stay in the process, so allocating the
same size again maps no fresh pages (run in a subprocess: the setting is for the process)."""

import json
import subprocess
import sys

PROGRAM = """
import ctypes, json, sys
from sae_jax import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory() and allocator.keep_freed_memory()  # idempotent
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults, size = [], 64 * 2**20  # 64 MiB: mmap'd by malloc's defaults
for _ in range(3):  # what XLA does with a step's temporaries: malloc, write, free
    before = allocator.minor_faults()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(allocator.minor_faults() - before)
print(json.dumps(faults))
"""


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    pages = 64 * 2**20 // 4096
    assert min(default) >= 0.9 * pages  # every allocation faults its pages in afresh
    assert kept[0] >= 0.9 * pages and max(kept[1:]) < 0.01 * pages, kept  # then reused
