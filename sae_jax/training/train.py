"""`train`: one run, from a store to a run directory, resumable.

A single run is the run lifecycle (`training.lifecycle`) with one member, stopped by the
first non-finite loss or params; a sweep (`training.sweep`) is the same lifecycle with many.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax

from sae_jax.config import TrainConfig
from sae_jax.data.store import open_store
from sae_jax.errors import UserError
from sae_jax.mesh import make_mesh
from sae_jax.rundir import data_widths
from sae_jax.training.lifecycle import (
    batch_feed,
    data_stats_once,
    open_member,
    train_members,
)
from sae_jax.training.step import check_mesh_fits


def train(cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path,
          progress: bool = True, devices: list | None = None) -> dict:
    """Trains (or resumes) the run in `run_dir` on the store in `data_dir`.

    Args:
      devices: devices for the mesh (default: all), e.g. a subset in tests.

    Returns:
      The metrics of the final logged step, as Python floats.

    Raises:
      UserError: bad input, or a non-finite loss or params (nothing non-finite is
        checkpointed; the last good checkpoint is kept).
      Preempted: SIGTERM arrived; a checkpoint of the current step was saved first.
    """
    store = open_store(data_dir)
    devices = list(jax.devices()) if devices is None else list(devices)
    cfg, d_in, d_out = data_widths(cfg, store)
    cfg = cfg.for_devices(devices, d_in)
    train_rows, _ = store.split(cfg.holdout)
    mesh = make_mesh(cfg.mesh, devices)
    check_mesh_fits(cfg, mesh)
    source, to_global = batch_feed(store, train_rows, cfg, mesh)
    stats = data_stats_once(train_rows, (d_in, d_out))
    with contextlib.ExitStack() as stack:
        run = open_member("run", cfg, run_dir, store, mesh, stats, (d_in, d_out), progress,
                          stack)
        train_members([run], mesh, source, to_global, run.start, cfg, run_dir, _stop)
    return run.last


def _stop(run) -> None:
    raise UserError(run.failed)
