"""Signals as flags that a loop checks between steps, and whether a process is alive.

A signal handled the default way interrupts Python wherever it is, which can be inside JAX's
dispatch or a tensorstore wait; cleanup after that (removing a half-written store, saving a
checkpoint) may then hang. Turning the signal into a flag lets the loop stop at a point of
its choosing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (signal 0 only checks): what lets
    a lease or a temporary directory left by a killed process be taken over safely."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid at all: leave it alone
    return True


@contextlib.contextmanager
def signal_flag(signum: int, repeat_raises: bool = False):
    """A `threading.Event` set by signal `signum` while the block runs.

    Args:
      repeat_raises: a second signal raises `KeyboardInterrupt` at once (a second Ctrl-C
        still stops a loop that is stuck).
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return

    def handler(*_):
        if repeat_raises and flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signum, handler)
    try:
        yield flag
    finally:
        signal.signal(signum, previous)
