"""The hidden temporary directories new stores are written in, and removing the ones that
killed processes left behind.

A local store is written in `.NAME.tmp-HOST-PID-XXXXXXXX` next to its final place and
renamed into place when complete. A process that dies without cleaning up (kill -9, an
out-of-memory kill, a power cut) leaves that directory, often hundreds of MB, behind. The
next writer into the same parent removes such directories, but only those whose name says
they belong to this host and to a process id that is no longer alive here: a live process's
directory, or one from another host sharing the file system, is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from sae_jax.interrupts import process_alive

TAG = ".tmp-"
_NAME = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)-[a-z0-9_]+$")


def this_host() -> str:
    """This machine's host name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def make_temp_dir(final: Path) -> str:
    """A new empty hidden directory next to `final`, named after this host and process."""
    prefix = f".{final.name}{TAG}{this_host()}-{os.getpid()}-"
    return tempfile.mkdtemp(prefix=prefix, dir=final.parent)


def stale_temp_dirs(parent: Path) -> list[Path]:
    """The temporary store directories in `parent` left by dead processes of this host."""
    if not parent.is_dir():
        return []
    host = this_host()
    stale = []
    for entry in sorted(parent.iterdir()):
        match = _NAME.match(entry.name)
        if (match and match["host"] == host and entry.is_dir() and not entry.is_symlink()
                and not process_alive(int(match["pid"]))):
            stale.append(entry)
    return stale


def remove_stale_temp_dirs(parent: Path) -> list[str]:
    """Removes `stale_temp_dirs(parent)`; returns their names."""
    removed = []
    for entry in stale_temp_dirs(parent):
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed
