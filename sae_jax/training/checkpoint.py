"""Orbax checkpoints of the train state: restorable onto any mesh, verified, never lost.

Each step `checkpoints/<step>/` holds two Orbax items: `params`, which `sae_jax.load`, export
and import-sae read and write without building an optimizer, and `train_state`, the rest of
the `TrainState` (step, optimizer state, dead-latent counters). Restores take an abstract
target whose shardings come from the *current* mesh, so a run saved on one mesh continues on
another.

**Digests.** Once Orbax has committed a step, `Manager` writes its SHA-256 digest
(`digest.py`). Saves are asynchronous, so "committed" is known only when Orbax's background
finalize has finished: the digest of step N is written in `Manager.wait_until_finished`,
which Orbax's own `save` calls before it starts step N+1 and which `close` calls. Until then
(and for good if the process dies first, e.g. `kill -9`) the newest step has no digest; such a
step is still used if it decodes and is finite, which catches missing files and NaN/Inf but
not a flipped bit that stays finite. Hashing costs the loop ~0.1-0.25 s per 100 MB of state
(a save + wait took 1.3-1.4x as long with the digest as without, on a loaded 2-core CPU box);
`save(..., digest=False)` and `write_digest` let `sae-jax bench` time both.

**Restoring for training** (`restore_latest_good`) takes the newest usable step:
- proven damage (a digest mismatch; without a digest, a structure that cannot be decoded;
  NaN/Inf values) quarantines the step and the next older one is tried with the same
  arguments. Quarantine never deletes: locally the step moves to `corrupt_checkpoints/<step>`,
  on object stores (which cannot rename) a marker `sae_jax_quarantined.json` is written
  into it and it is skipped. The one exception: when training reaches that step again, the
  marked copy is replaced by the new save of the same step.
- a read error that proves nothing (timeout, 503) is retried with backoff, then stops with a
  clear error; nothing is moved.
- it never starts from step 0 while any checkpoint, quarantined or not, exists.

Checkpoints written before params had their own item (one `default` item with the whole
`TrainState`) are still read, for training and by `read_params`.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from sae_jax import files
from sae_jax.errors import UserError
from sae_jax.training.digest import DAMAGED, OK, UNDIGESTED, check_digest, write_digest
from sae_jax.training.distributed import host_value

CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "corrupt_checkpoints"
QUARANTINE_MARKER = "sae_jax_quarantined.json"
PARAMS, TRAIN_STATE = "params", "train_state"
LEGACY_ITEM = "default"  # before params had their own item: the whole TrainState
RETRY_DELAYS = (1.0, 4.0, 16.0)  # seconds between tries of a read that failed transiently

# Status words of tensorstore / object-store errors that say "try again", and of errors that
# say the bytes on disk do not form a checkpoint.
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")
_UNDECODABLE = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION",
                "Error opening", "Error reading", "was not found in the checkpoint")


class Manager(ocp.CheckpointManager):
    """An Orbax manager that writes the digest of each step saved with `save(...,
    digest=True)` once Orbax has finished it (see the module docstring for when)."""

    def __init__(self, *args, **kwargs):
        self.digest_pending: set[int] = set()
        super().__init__(*args, **kwargs)

    def wait_until_finished(self):
        super().wait_until_finished()
        pending, self.digest_pending = self.digest_pending, set()
        if jax.process_index() != 0:
            return
        for step in sorted(set(pending) & set(self.all_steps())):
            try:
                write_digest(step_dir(self, step))
            except Exception as e:  # the checkpoint itself is fine: it just stays undigested
                print(f"sae-jax: warning: could not write the digest of checkpoint {step} "
                      f"({_reason(e)}); it stays usable but unverified", file=sys.stderr)


def manager(run_dir: str | Path, cfg=None) -> Manager:
    """The run's checkpoint manager: for training when given `cfg` (retention), else for
    reading only (nothing is created or deleted)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints if cfg else None,
        create=cfg is not None,
    )
    directory = (files.join(run_dir, CHECKPOINT_DIR) if files.is_remote(run_dir)
                 else Path(run_dir).absolute() / CHECKPOINT_DIR)
    handlers = {PARAMS: ocp.StandardCheckpointHandler(),
                TRAIN_STATE: ocp.StandardCheckpointHandler()}
    return Manager(directory, options=options, item_names=tuple(handlers),
                   item_handlers=handlers)


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
    """The directory (or object-store prefix) of checkpoint `step`."""
    return files.join(str(mngr.directory), str(step))


def _rest(state) -> dict:
    """The train state without its params: the `train_state` item."""
    return {name: getattr(state, name) for name in state.__dataclass_fields__
            if name != PARAMS}


def save(mngr: Manager, step: int, state, digest: bool = True) -> None:
    """Saves `state` as checkpoint `step` asynchronously (the caller picks the steps).

    Its digest is written once Orbax has finished it; `digest=False` skips it (only so that
    `sae-jax bench` can time a save with and without one)."""
    _replace_if_quarantined(mngr, step)
    mngr.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(state.params),
        TRAIN_STATE: ocp.args.StandardSave(_rest(state))}), force=True)
    if digest:
        mngr.digest_pending.add(step)


def save_params(mngr: Manager, step: int, params) -> None:
    """Saves params alone as checkpoint `step` (an imported SAE, which has no optimizer
    state: it can be loaded, evaluated and exported, not resumed)."""
    mngr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params)}),
              force=True)
    mngr.digest_pending.add(step)


def _is_legacy(path: str) -> bool:
    return (epath.Path(path) / LEGACY_ITEM).exists() and not (epath.Path(path) / PARAMS).exists()


def _restore_legacy(path: str, target, params_only: bool):
    """A checkpoint from before params had their own item (one `default` item holding the
    whole TrainState); `params_only` reads just its params."""
    item = {PARAMS: target} if params_only else target
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        out = checkpointer.restore(epath.Path(path) / LEGACY_ITEM, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=params_only))
    finally:
        checkpointer.close()
    return out[PARAMS] if params_only else out


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores the whole train state of `step` (default: latest) into the shapes and
    shardings of `abstract_state`, with no checks (see `restore_latest_good`).

    Args:
      abstract_state: a `TrainState` of `jax.ShapeDtypeStruct` with `.sharding` set.
    """
    step = mngr.latest_step() if step is None else step
    if _is_legacy(step_dir(mngr, step)):
        return _restore_legacy(step_dir(mngr, step), abstract_state, params_only=False)
    out = mngr.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(abstract_state.params),
        TRAIN_STATE: ocp.args.StandardRestore(_rest(abstract_state))}))
    return abstract_state.replace(params=out[PARAMS], **out[TRAIN_STATE])


def restore_params(mngr: ocp.CheckpointManager, abstract_params, step: int):
    """Restores only the params of `step` (no optimizer state is read or needed)."""
    if _is_legacy(step_dir(mngr, step)):
        return _restore_legacy(step_dir(mngr, step), abstract_params, params_only=True)
    out = mngr.restore(step, args=ocp.args.Composite(
        **{PARAMS: ocp.args.StandardRestore(abstract_params)}))
    return out[PARAMS]


def abstract_with_shardings(shapes, shardings):
    """Pairs `jax.eval_shape` output with a matching pytree of shardings."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


# --- reading with checks ------------------------------------------------------------------


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _is_transient(e: Exception) -> bool:
    """A read error that says nothing about the files: retry it, never quarantine on it."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                      PermissionError)):
        return False
    return isinstance(e, OSError) or any(word in str(e) for word in _TRANSIENT)


def _is_undecodable(e: Exception) -> bool:
    return (isinstance(e, (FileNotFoundError, KeyError, json.JSONDecodeError))
            or any(word in str(e) for word in _UNDECODABLE))


def _with_retries(what: str, read):
    """`read()`, retried after `RETRY_DELAYS` while it fails transiently; then a UserError."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return read()
        except Exception as e:
            if not _is_transient(e):
                raise
            if delay is None:
                raise UserError(
                    f"{what}: still failing after {len(RETRY_DELAYS) + 1} tries ({_reason(e)});"
                    " a storage or network problem, not damage: nothing was moved or deleted,"
                    " rerun when the storage answers") from None
            print(f"sae-jax: warning: {what}: {_reason(e)}; retrying in {delay:g} s",
                  file=sys.stderr)
            time.sleep(delay)


def _all_finite(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return all(bool(host_value(jnp.isfinite(x).all())) for x in leaves)


def _quarantined_in_place(path: str) -> bool:
    return files.exists(files.join(path, QUARANTINE_MARKER))


def _read_checked(mngr, step: int, read, under: str = ""):
    """`(value, None)` from an intact step; `(None, why)` for a step with proven damage.

    A step that cannot be read although nothing proves it damaged (intact digest, or no
    digest and an error that is not a decoding error) is a UserError: quarantining it
    could throw away good state."""
    path, where = step_dir(mngr, step), f"checkpoint {step} in {mngr.directory}"
    try:
        status, detail = _with_retries(f"reading {where}",
                                       lambda: check_digest(path, under))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot check {where}: {_reason(e)}") from None
    if status == DAMAGED:
        return None, detail
    try:
        value = _with_retries(f"restoring {where}", read)
    except UserError:
        raise
    except Exception as e:
        reason = _reason(e)
        if status == OK:
            hint = (" (a checkpoint of params only, as import-sae writes, cannot resume "
                    "training)" if f'"{TRAIN_STATE}" was not found' in reason else "")
            raise UserError(f"{where} is intact (its digest matches) but cannot be "
                            f"restored: {reason}{hint}") from None
        if _is_undecodable(e):
            return None, f"cannot be decoded: {reason}"
        raise UserError(f"{where} cannot be restored ({reason}) and has no digest that "
                        f"would prove it damaged, so nothing was moved; move {path} aside "
                        "to use an older checkpoint") from None
    if not _all_finite(value):
        return None, "it holds NaN/Inf values"
    assert status in (OK, UNDIGESTED)
    return value, None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _quarantine_dir(mngr) -> Path:
    return Path(str(mngr.directory)).parent / QUARANTINE_DIR


def _quarantine(mngr: ocp.CheckpointManager, step: int, why: str) -> str:
    """Sets a damaged step aside without deleting anything; returns where it went."""
    src = step_dir(mngr, step)
    record = json.dumps({"step": step, "reason": why,
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
    if files.is_remote(src):
        dst, where = src, f"marked {QUARANTINE_MARKER} in place (object stores cannot move it)"
    else:
        parent = _quarantine_dir(mngr)
        names = {p.name for p in parent.iterdir()} if parent.is_dir() else set()
        name = next(n for n in (f"{step}.{i}" if i else str(step) for i in itertools.count())
                    if n not in names)
        dst, where = str(parent / name), f"moved to {parent / name}"
    _sync(f"sae_jax_quarantine_{step}_begin")  # every process has finished reading it
    if jax.process_index() == 0:
        if dst != src:
            Path(dst).parent.mkdir(exist_ok=True)
            os.replace(src, dst)
        files.write_text(files.join(dst, QUARANTINE_MARKER), record)
    _sync(f"sae_jax_quarantine_{step}_end")
    mngr.reload()
    return where


def _replace_if_quarantined(mngr: ocp.CheckpointManager, step: int) -> None:
    """Training reached a step that is quarantined in place (object stores): the new save
    of the same step takes its place."""
    if step in mngr.all_steps() and _quarantined_in_place(step_dir(mngr, step)):
        print(f"sae-jax: warning: replacing quarantined checkpoint {step} by a new save",
              file=sys.stderr)
        mngr.delete(step)


def restore_latest_good(mngr: ocp.CheckpointManager, abstract_state):
    """The train state of the newest usable checkpoint, or None if the run has none at all.

    Damaged steps are quarantined (with a warning) and older ones tried; a run whose
    checkpoints are all damaged is a UserError, never a fresh start (see module docstring).
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    skipped = []
    for step in steps:
        if _quarantined_in_place(step_dir(mngr, step)):
            continue
        state, damage = _read_checked(
            mngr, step, lambda s=step: restore(mngr, abstract_state, s))
        if damage is None:
            if skipped:
                print(f"sae-jax: warning: resuming from checkpoint {step}", file=sys.stderr)
            return state
        where = _quarantine(mngr, step, damage)
        skipped.append(step)
        print(f"sae-jax: warning: checkpoint {step} is damaged ({damage}); {where}; "
              "trying the previous one", file=sys.stderr)
    if steps or has_quarantined(mngr):
        where = (f"marked {QUARANTINE_MARKER}" if files.is_remote(mngr.directory)
                 else f"moved to {_quarantine_dir(mngr)}")
        raise UserError(
            f"no usable checkpoint in {mngr.directory} (damaged ones are {where}); refusing "
            "to start over from step 0: to start a new run use a new RUN_DIR, or move the "
            "checkpoints aside")
    return None


def has_quarantined(mngr) -> bool:
    """Whether a local run has checkpoints moved aside (on object stores they stay in
    `checkpoints/`, marked, so they count among its steps)."""
    q = _quarantine_dir(mngr)
    return not files.is_remote(mngr.directory) and q.is_dir() and any(q.iterdir())


def read_params(mngr: ocp.CheckpointManager, abstract_params,
                step: int | None = None) -> tuple[dict, int]:
    """`(params, step)` of `step`, or of the newest intact checkpoint. Reading never changes
    a run: a damaged newer step is skipped with a warning (training quarantines it)."""
    steps = ([step] if step is not None else
             [s for s in sorted(mngr.all_steps(), reverse=True)
              if not _quarantined_in_place(step_dir(mngr, s))])
    for s in steps:
        params, damage = _read_checked(
            mngr, s, lambda s=s: restore_params(mngr, abstract_params, s), under=PARAMS)
        if damage is None:
            return params, s
        if step is not None:
            raise UserError(f"checkpoint {s} in {mngr.directory} is damaged ({damage})")
        print(f"sae-jax: warning: checkpoint {s} is damaged ({damage}); reading the previous "
              "one", file=sys.stderr)
    raise UserError(f"no intact checkpoint in {mngr.directory}")


def verify_checkpoints(run_dir: str | Path) -> list[str]:
    """One line per checkpoint of the run that is not verifiably intact: damaged (digest
    mismatch), without a digest, or quarantined. An empty list: every checkpoint matches
    its digest. (For `sae-jax check RUN_DIR`.)"""
    lines = []
    none_here = not files.is_remote(run_dir) and not (Path(run_dir) / CHECKPOINT_DIR).is_dir()
    mngr = None if none_here else manager(run_dir)
    try:
        for step in sorted(mngr.all_steps()) if mngr else []:
            path = step_dir(mngr, step)
            marker = files.read_text(files.join(path, QUARANTINE_MARKER))
            if marker is not None:
                lines.append(f"checkpoint {step}: quarantined in place: {_marker_reason(marker)}")
                continue
            status, detail = _with_retries(f"reading checkpoint {step}",
                                           lambda p=path: check_digest(p))
            if status == DAMAGED:
                lines.append(f"checkpoint {step}: damaged: {detail}")
            elif status == UNDIGESTED:
                lines.append(f"checkpoint {step}: no digest, cannot be verified (saved before "
                             "sae_jax wrote digests, or the process stopped before it did)")
    finally:
        if mngr:
            mngr.close()
    quarantine = Path(run_dir) / QUARANTINE_DIR
    if not files.is_remote(run_dir) and quarantine.is_dir():
        for entry in sorted(quarantine.iterdir()):
            marker = files.read_text(entry / QUARANTINE_MARKER)
            why = _marker_reason(marker) if marker else "moved aside"
            lines.append(f"{QUARANTINE_DIR}/{entry.name}: quarantined: {why}")
    return lines


def _marker_reason(text: str) -> str:
    try:
        return str(json.loads(text)["reason"])
    except (ValueError, KeyError, TypeError):
        return "reason unreadable"
