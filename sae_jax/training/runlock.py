"""One writer per run directory: a lease object taken with a conditional write.

Two `train` processes on one RUN_DIR would interleave metrics, and each one's checkpoint
retention would delete the other's checkpoints. So a run directory holds `run.lock`, a small
JSON lease `{host, pid, token, expires}`. It is created only if absent and renewed or
released only if unchanged since we wrote it (tensorstore's `if_equal` generation
precondition: an atomic create-if-absent on local disks and a generation match on `gs://`),
so exactly one process holds it. A heartbeat thread renews it every `TTL_S / 3`.

A lease left behind by a dead holder is taken over when it has expired, or at once when the
holder ran on this host and its pid is gone (kill -9 on a laptop does not make the next run
wait). Only process 0 of a multi-host run takes the lease.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import tensorstore as ts

from sae_jax import files
from sae_jax.errors import UserError
from sae_jax.interrupts import process_alive

LOCK_FILE = "run.lock"
TTL_S = 60.0
_MISSING = b"\x02"  # tensorstore's generation of an absent key: "write only if absent"


class RunLock:
    """The lease on one run directory while a `with` block runs (see the module doc)."""

    def __init__(self, run_dir, ttl_s: float = TTL_S):
        self.run_dir, self.ttl_s = str(run_dir), ttl_s
        if not files.is_remote(run_dir):
            os.makedirs(run_dir, exist_ok=True)
        self.store = ts.KvStore.open(files.kvstore_url(run_dir), context=files.CONTEXT).result()
        self.token = uuid.uuid4().hex
        self.generation: bytes | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _lease(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "token": self.token,
                           "expires": time.time() + self.ttl_s}).encode()

    def _write(self, if_equal: bytes) -> bool:
        stamp = self.store.write(LOCK_FILE, self._lease(), if_equal=if_equal).result()
        if stamp.generation:
            self.generation = stamp.generation
        return bool(stamp.generation)

    def acquire(self) -> None:
        """Takes the lease, or raises a UserError naming the holder's host and pid."""
        for _ in range(3):  # a race with another starter: read again and decide again
            current = self.store.read(LOCK_FILE).result()
            if current.state != "value":
                if self._write(_MISSING):
                    return
                continue
            holder = self._holder(current.value)
            if not self._stale(holder):
                raise UserError(
                    f"{self.run_dir} is in use by pid {holder.get('pid')} on host "
                    f"{holder.get('host')} (lease {files.join(self.run_dir, LOCK_FILE)}); "
                    "wait for that run to end, or stop it")
            if self._write(current.stamp.generation):
                return
        raise UserError(f"could not take the lease on {self.run_dir}: another process keeps "
                        "taking it")

    @staticmethod
    def _holder(raw: bytes) -> dict:
        try:
            holder = json.loads(raw)
            return holder if isinstance(holder, dict) else {}
        except ValueError:
            return {}  # a damaged lease protects nothing

    @staticmethod
    def _stale(holder: dict) -> bool:
        expires = holder.get("expires")
        if not isinstance(expires, (int, float)) or expires < time.time():
            return True
        pid = holder.get("pid")
        same_host = holder.get("host") == socket.gethostname()
        return same_host and isinstance(pid, int) and not process_alive(pid)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                renewed = self._write(self.generation)
            except Exception:  # a transient storage error: try again at the next beat
                continue
            if not renewed:
                self.lost.set()
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation is not None and not self.lost.is_set():
            self.store.write(LOCK_FILE, None, if_equal=self.generation).result()

    def __enter__(self) -> RunLock:
        self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name=f"run-lock {self.run_dir}")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self) -> None:
        """Raises if another process took the lease while we held it (e.g. after a stall
        longer than the TTL): two writers must never both go on."""
        if self.lost.is_set():
            raise UserError(f"lost the lease on {self.run_dir} to another process; stopping "
                            "without saving (the other process owns the run now)")
