"""Multi-host start-up: one JAX process per host, all devices in one global mesh.

On Cloud TPU every worker runs the same command with `SAE_JAX_DISTRIBUTED=1` and
`jax.distributed.initialize()` discovers the slice by itself. Elsewhere (CPU or GPU
clusters, and the two-process test on localhost) the coordinator address, the number of
processes and this process's id are given explicitly. Must run before anything else
touches a JAX backend.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding

from sae_jax.errors import UserError

ENV_FLAG = "SAE_JAX_DISTRIBUTED"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the process group if asked to; returns whether it did.

    Args:
      coordinator_address: `host:port` of process 0, or None for auto-detection when
        `SAE_JAX_DISTRIBUTED=1` (Cloud TPU), or no multi-process at all.
      num_processes, process_id: required with an explicit coordinator address.
    """
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise UserError("--coordinator-address needs --num-processes and --process-id")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        # CPU devices of different processes talk through gloo (no-op for TPU/GPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if os.environ.get(ENV_FLAG) == "1":
        jax.distributed.initialize()
        return True
    return False


def host_value(tree):
    """Fetches replicated arrays to the host; works when they span several processes
    (where `jax.device_get` would refuse arrays that are not fully addressable)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def batch_share(sharding: NamedSharding, batch_size: int, d_in: int) -> tuple[int, int]:
    """Which slice of every global batch this process must load: `(index, count)` such that
    the process reads rows [index·B/count, (index+1)·B/count).

    Processes that hold the same batch rows (e.g. a mesh with a 1-wide data axis) get the
    same slice.
    """
    rows = {idx[0].indices(batch_size)[:2]
            for idx in sharding.addressable_devices_indices_map((batch_size, d_in)).values()}
    lo, hi = min(a for a, _ in rows), max(b for _, b in rows)
    if sum(b - a for a, b in rows) != hi - lo or batch_size % (hi - lo):
        raise UserError("this mesh gives a process a non-contiguous part of the batch; "
                        "put the data axis first in the device order")
    return lo // (hi - lo), batch_size // (hi - lo)
