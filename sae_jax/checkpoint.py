"""Orbax checkpoints of the train state, restorable onto any mesh.

A thin layer over `ocp.CheckpointManager`: saves asynchronously and restores from an
abstract target whose shardings come from the *current* mesh, so a run saved on one mesh
continues on another.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def manager(run_dir: str | Path, cfg=None) -> ocp.CheckpointManager:
    """The run's checkpoint manager: for training when given `cfg` (retention), else for
    reading only (nothing is created or deleted)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints if cfg else None,
        create=cfg is not None,
    )
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINT_DIR, options=options)


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
