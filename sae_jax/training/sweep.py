"""Many SAEs in one pass over the data: `sae-jax train DATA RUN width=1024,4096 k=16,32`.

A *sweep* is a grid of training runs that differ only in keys that do not change which
batches are read (`SWEEPABLE`). They are trained together: every step reads one batch,
moves it to the devices once, and feeds it to every member's own train step, all fused in
one `jax.jit` (one dispatch per step). Members of different widths cannot be stacked into
one array, so the fused program is simply each member's existing step applied to the same
batch; XLA compiles them into one executable.

Each member is an ordinary run in `RUN_DIR/<name>` (its own `config.json`, Orbax
checkpoints, `metrics.jsonl`, TensorBoard events), so `sae_jax.load`, `sae-jax eval`,
`dashboard` and `export` work on it, and it holds the params a separate `sae-jax train`
with the same config would have produced (bitwise equal in the tests, on CPU). `<name>` is
built from the member's swept values, e.g. `width=1024,k=16`; `RUN_DIR/sweep.json` lists
the members. A seed sweep (`seed=0,1,2`) varies only the initialisation: its members share
one `data_seed` (the first seed listed unless given), so `seed=1` holds what
`sae-jax train DATA RUN seed=1 data_seed=0` would.
Re-running the same command resumes every member from its latest good checkpoint; a member
that was further along than the others is left alone until the others catch up.

A member whose loss becomes non-finite is stopped (nothing non-finite is checkpointed)
while the others go on; the sweep then ends with one error naming it.

With `batch_members` (`--batch-members`) members of equal shapes that differ only in seed,
lr or sparsity_coeff run as one vmapped step instead (`training.stacked`): still one run
directory each, equal to separate runs to float32 rounding rather than bitwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import jax
from tqdm import tqdm

from sae_jax import files
from sae_jax.config import TrainConfig, make_config
from sae_jax.data.store import open_store
from sae_jax.errors import UserError
from sae_jax.mesh import auto_mesh_spec, device_memory_bytes, make_mesh
from sae_jax.rundir import CONFIG_FILE, data_widths
from sae_jax.training.grid import SHARED_KEYS, config_names, expand_grid, run_names
from sae_jax.training.lifecycle import (
    Member,
    batch_feed,
    data_stats_once,
    open_member,
    train_members,
)
from sae_jax.training.runlock import RunLock
from sae_jax.training.step import check_mesh_fits

SWEEP_FILE = "sweep.json"


def shared_config(cfgs: list[TrainConfig], devices: list, store
                  ) -> tuple[list[TrainConfig], int, int | None]:
    """Resolves every member's data- and device-dependent defaults (`transcoder`, one mesh,
    the compute dtype): `(cfgs, d_in, d_out)` as `run.data_widths` gives them.

    The default mesh is chosen for the *sum* of the members' widths (they all live on the
    devices at once). Raises a UserError if the members disagree on a key of `SHARED_KEYS`.
    """
    first = cfgs[0].to_dict()
    for cfg in cfgs[1:]:
        other = cfg.to_dict()
        for key in SHARED_KEYS:
            if other[key] != first[key]:
                hint = " (seeds differ: give every member one data_seed)" * (
                    key == "data_seed")
                raise UserError(f"members of one sweep must share {key}: "
                                f"{first[key]!r} vs {other[key]!r}{hint}")
    resolved = [data_widths(c, store) for c in cfgs]
    _, d_in, d_out = resolved[0]
    mesh = cfgs[0].mesh or auto_mesh_spec(len(devices), d_in, sum(c.width for c in cfgs),
                                          device_memory_bytes(devices[0]))
    cfgs = [dataclasses.replace(c, mesh=mesh).for_devices(devices, d_in) for c, _, _ in resolved]
    return cfgs, d_in, d_out


def _member_dir(run_dir: str | Path, name: str) -> str:
    return files.join(run_dir, name) if files.is_remote(run_dir) else str(Path(run_dir) / name)


def _write_sweep_file(run_dir, members: list[Member]) -> None:
    if jax.process_index() != 0:
        return
    record = {"members": [{"name": m.name, "run_dir": m.run_dir, "config": m.cfg.to_dict()}
                          for m in members]}
    files.write_text(files.join(run_dir, SWEEP_FILE), json.dumps(record, indent=2) + "\n")


def _drop(member: Member) -> None:
    member.failed = f"{member.name}: {member.failed}"
    print(f"sae-jax: warning: {member.failed}; the other members go on", file=sys.stderr)


def train_sweep(cfgs: list[TrainConfig], data_dir: str | Path, run_dir: str | Path,
                progress: bool = True, names: list[str] | None = None,
                devices: list | None = None, batch_members: bool = False) -> dict:
    """Trains (or resumes) every config in one pass over the data.

    Args:
      cfgs: one config per member; they must agree on `SHARED_KEYS`.
      run_dir: the sweep directory; member `i` is the run `run_dir/names[i]`.
      names: member directory names (default: `config_names(cfgs)`).
      devices: devices for the one mesh all members share (default: all).
      batch_members: members that differ only in `stacked.BATCHABLE_KEYS` run as one
        vmapped step (equal to separate runs to float32 rounding, not bitwise).

    Returns:
      `{"run_dir", "steps", "members": [{"name", "run_dir", "metrics"}]}` with each
      member's metrics of its final logged step.

    Raises:
      UserError: bad input, or a member's loss became non-finite (after the others finished).
      Preempted: SIGTERM arrived; every member saved a checkpoint of the current step first.
    """
    if not cfgs:
        raise UserError("a sweep needs at least one member")
    names = config_names(cfgs) if names is None else list(names)
    if len(names) != len(cfgs) or len(set(names)) != len(names):
        raise UserError("a sweep needs one distinct name per member")
    if files.exists(files.join(run_dir, CONFIG_FILE)):
        raise UserError(f"{run_dir} holds a single run; give the sweep its own RUN_DIR")
    store = open_store(data_dir)
    devices = list(jax.devices()) if devices is None else list(devices)
    cfgs, d_in, d_out = shared_config(cfgs, devices, store)
    shared = cfgs[0]
    train_rows, _ = store.split(shared.holdout)
    mesh = make_mesh(shared.mesh, devices)
    for cfg in cfgs:
        check_mesh_fits(cfg, mesh)
    source, to_global = batch_feed(store, train_rows, shared, mesh)
    stats = data_stats_once(train_rows, (d_in, d_out))  # read once, only if a member is new
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            stack.enter_context(RunLock(run_dir))
        members = [open_member(n, c, _member_dir(run_dir, n), store, mesh, stats,
                               (d_in, d_out), False, stack) for n, c in zip(names, cfgs)]
        _write_sweep_file(run_dir, members)
        start = max(m.start for m in members)
        bar = stack.enter_context(tqdm(
            total=shared.steps, initial=start, unit="step", dynamic_ncols=True,
            disable=not (progress and jax.process_index() == 0), desc=f"{len(members)} SAEs"))
        train_members(members, mesh, source, to_global, start, shared, run_dir, _drop,
                      bar=bar, batch=batch_members)
    failed = [m.failed for m in members if m.failed]
    if failed:
        raise UserError(f"{len(failed)} of {len(members)} members stopped: "
                        + "; ".join(failed) + ". The other members finished")
    return {"run_dir": str(run_dir), "steps": shared.steps,
            "members": [{"name": m.name, "run_dir": m.run_dir, "metrics": m.last}
                        for m in members]}


def run_sweep_command(data_dir: str, run_dir: str, pairs: list[str],
                      progress: bool = True, batch_members: bool = False) -> dict:
    """`sae-jax train DATA_DIR RUN_DIR` when `is_sweep(pairs)`: expands the grid, names the
    members and trains them in one pass (see `train_sweep`)."""
    grid = expand_grid(pairs)
    names = run_names(grid)
    return train_sweep([make_config(p) for p in grid], data_dir, run_dir, progress=progress,
                       names=names, batch_members=batch_members)
