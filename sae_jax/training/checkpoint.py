"""Orbax checkpoints of the train state, restorable onto any mesh.

A thin layer over `ocp.CheckpointManager`: saves asynchronously and restores from an
abstract target whose shardings come from the *current* mesh, so a run saved on one mesh
continues on another.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sae_jax import files
from sae_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"


def manager(run_dir: str | Path, cfg=None) -> ocp.CheckpointManager:
    """The run's checkpoint manager: for training when given `cfg` (retention), else for
    reading only (nothing is created or deleted)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints if cfg else None,
        create=cfg is not None,
    )
    directory = (files.join(run_dir, CHECKPOINT_DIR) if files.is_remote(run_dir)
                 else Path(run_dir).absolute() / CHECKPOINT_DIR)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Saves `state` as checkpoint `step` (asynchronously; the caller picks the steps)."""
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores `step` (default: latest) into the shapes and shardings of `abstract_state`.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with `.sharding` set.
    """
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def abstract_with_shardings(shapes, shardings):
    """Pairs `jax.eval_shape` output with a matching pytree of shardings."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def restore_latest_good(mngr: ocp.CheckpointManager, abstract_state):
    """Restores the newest checkpoint that reads back, or returns None if there is none.

    An unreadable checkpoint (truncated or corrupted files) gets a warning and is moved
    aside to `corrupt_checkpoints/` in a local run dir (deleted on object stores, which
    cannot rename) before the next older one is tried; a run whose checkpoints are all
    unreadable is an error.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            return restore(mngr, abstract_state, step)
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            print(f"sae-jax: warning: checkpoint {step} is unreadable ({reason}); "
                  "falling back to the previous one", file=sys.stderr)
            _move_aside(mngr, step)
    if steps:
        raise UserError(f"no readable checkpoint in {mngr.directory}")
    return None


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> None:
    if files.is_remote(mngr.directory):
        mngr.delete(step)
        return
    src = Path(str(mngr.directory)) / str(step)
    dst = src.parent.parent / "corrupt_checkpoints" / str(step)
    dst.parent.mkdir(exist_ok=True)
    os.replace(src, dst)
    mngr.reload()
