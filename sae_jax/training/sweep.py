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
the members.
Re-running the same command resumes every member from its latest good checkpoint; a member
that was further along than the others is left alone until the others catch up.

A member whose loss becomes non-finite is stopped (nothing non-finite is checkpointed)
while the others go on; the sweep then ends with one error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from sae_jax import files
from sae_jax.config import TrainConfig, make_config
from sae_jax.data.loader import batches
from sae_jax.data.store import open_store
from sae_jax.errors import Preempted, UserError
from sae_jax.mesh import auto_mesh_spec, batch_sharding, device_memory_bytes, make_mesh, replicated
from sae_jax.rundir import CONFIG_FILE, RunInfo, data_widths, prepare_run
from sae_jax.training import checkpoint
from sae_jax.training.distributed import host_value
from sae_jax.training.grid import SHARED_KEYS, config_names, expand_grid, run_names
from sae_jax.training.metrics import MetricsLog
from sae_jax.training.train import (
    batch_feed,
    check_mesh_fits,
    compile_train_step,
    estimate_scales,
    init_or_restore,
    make_optimizer,
    make_train_step,
    sigterm_flag,
)

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
                raise UserError(f"members of one sweep must share {key}: "
                                f"{first[key]!r} vs {other[key]!r}")
    resolved = [data_widths(c, store) for c in cfgs]
    _, d_in, d_out = resolved[0]
    mesh = cfgs[0].mesh or auto_mesh_spec(len(devices), d_in, sum(c.width for c in cfgs),
                                          device_memory_bytes(devices[0]))
    cfgs = [dataclasses.replace(c, mesh=mesh).for_devices(devices, d_in) for c, _, _ in resolved]
    return cfgs, d_in, d_out


@dataclass
class Member:
    """One run of the sweep and what its loop needs."""

    name: str
    run_dir: str
    cfg: TrainConfig
    run: RunInfo
    tx: object
    mngr: object
    state: object
    state_sh: object
    log: MetricsLog
    start: int
    last: dict = dataclasses.field(default_factory=dict)
    failed: str | None = None


def make_fused_step(members: list[Member], mesh):
    """Returns the jitted `step(states, x) -> (states, metrics)` over `members`: each
    member's own train step on the same batch, one compiled program, old states donated."""
    steps = [make_train_step(m.cfg, m.tx, mesh, m.run.input_scale, m.run.target_scale)
             for m in members]

    def fused_step(states, x):
        outs = [step(state, x) for step, state in zip(steps, states)]
        return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

    state_sh = tuple(m.state_sh for m in members)
    return jax.jit(fused_step, in_shardings=(state_sh, batch_sharding(mesh)),
                   out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)


def _member_dir(run_dir: str | Path, name: str) -> str:
    return files.join(run_dir, name) if files.is_remote(run_dir) else str(Path(run_dir) / name)


def _open_member(name, cfg, run_dir, store, train_rows, mesh, scales, widths) -> Member:
    member_dir = _member_dir(run_dir, name)
    run = prepare_run(member_dir, cfg, store, scales, widths)
    tx = make_optimizer(cfg)
    mngr = checkpoint.manager(member_dir, cfg)
    state, state_sh = init_or_restore(cfg, run, mesh, tx, mngr, train_rows)
    start = int(host_value(state.step))
    log = MetricsLog(member_dir, cfg, start, progress=False)
    return Member(name, member_dir, cfg, run, tx, mngr, state, state_sh, log, start)


def _write_sweep_file(run_dir, members: list[Member]) -> None:
    if jax.process_index() != 0:
        return
    record = {"members": [{"name": m.name, "run_dir": m.run_dir, "config": m.cfg.to_dict()}
                          for m in members]}
    files.write_text(files.join(run_dir, SWEEP_FILE), json.dumps(record, indent=2) + "\n")


def _end_of_step(live: list[Member], done: int, metrics, shared: TrainConfig,
                 stop: bool) -> None:
    """What a single run does after step `done`, for every live member: log at log steps
    and before saves, stop a member whose loss is non-finite, checkpoint the others at
    checkpoint steps, the last step, or when stopping."""
    saving = done % shared.ckpt_every == 0 or done == shared.steps or stop
    if done % shared.log_every == 0 or saving:
        for m, values in zip(live, host_value(metrics)):
            m.last = m.log.record(done, values)
            if not np.isfinite(m.last["loss"]):
                m.failed = (f"{m.name}: loss is {m.last['loss']} at step {done}; the last good "
                            f"checkpoint (step {m.mngr.latest_step()}) is kept in {m.run_dir}")
                print(f"sae-jax: warning: {m.failed}; the other members go on", file=sys.stderr)
    if saving:
        for m in live:
            if not m.failed:
                checkpoint.save(m.mngr, done, m.state)


def _catch_up(members: list[Member], mesh, source, to_global, until: int, shared,
              preempted) -> None:
    """Advances members that resumed from an older checkpoint to step `until`, each with its
    own step on the very batches the others saw (batch `s` is a pure function of `s`)."""
    for m in members:
        if m.start >= until:
            continue
        step_fn = compile_train_step(m.cfg, m.tx, mesh, m.state_sh, m.run.input_scale,
                                     m.run.target_scale)
        for done in range(m.start + 1, until + 1):
            m.state, metrics = step_fn(m.state, to_global(source[done - 1]))
            _end_of_step([m], done, (metrics,), shared, preempted.is_set())
            _stop_if_preempted([m], done, preempted, m.run_dir)
            if m.failed:
                break
        m.start = until


def _stop_if_preempted(live: list[Member], done: int, preempted, run_dir) -> None:
    if preempted.is_set():
        for m in live:
            m.mngr.wait_until_finished()
        raise Preempted(f"SIGTERM at step {done}: checkpoints saved in {run_dir}; rerun the "
                        "same command to resume")


def train_sweep(cfgs: list[TrainConfig], data_dir: str | Path, run_dir: str | Path,
                progress: bool = True, names: list[str] | None = None,
                devices: list | None = None) -> dict:
    """Trains (or resumes) every config in one pass over the data.

    Args:
      cfgs: one config per member; they must agree on `SHARED_KEYS`.
      run_dir: the sweep directory; member `i` is the run `run_dir/names[i]`.
      names: member directory names (default: `config_names(cfgs)`).
      devices: devices for the one mesh all members share (default: all).

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
    scale_cache: list = []

    def scales():  # estimated once, and only if some member is new
        if not scale_cache:
            scale_cache.append(estimate_scales((d_in, d_out), train_rows))
        return scale_cache[0]

    members = [_open_member(n, c, run_dir, store, train_rows, mesh, scales, (d_in, d_out))
               for n, c in zip(names, cfgs)]
    _write_sweep_file(run_dir, members)
    source, to_global = batch_feed(store, train_rows, shared, mesh)
    start = max(m.start for m in members)
    bar = tqdm(total=shared.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (progress and jax.process_index() == 0),
               desc=f"{len(members)} SAEs")
    try:
        with sigterm_flag() as preempted:
            _catch_up(members, mesh, source, to_global, start, shared, preempted)
            _train_members(members, mesh, source, to_global, start, shared, run_dir, bar,
                           preempted)
    finally:
        for m in members:
            m.mngr.wait_until_finished()
            m.mngr.close()
            m.log.close()
        bar.close()
    failed = [m.failed for m in members if m.failed]
    if failed:
        raise UserError(f"{len(failed)} of {len(members)} members stopped: "
                        + "; ".join(failed) + ". The other members finished")
    return {"run_dir": str(run_dir), "steps": shared.steps,
            "members": [{"name": m.name, "run_dir": m.run_dir, "metrics": m.last}
                        for m in members]}


def _train_members(members, mesh, source, to_global, start, shared, run_dir, bar,
                   preempted) -> None:
    """The one-pass loop: one batch per step for all live members."""
    live = [m for m in members if m.start < shared.steps and not m.failed]
    step_fn = make_fused_step(live, mesh) if live else None
    for done, x in enumerate(batches(source, start), start + 1):
        if not live:
            break
        states, metrics = step_fn(tuple(m.state for m in live), to_global(x))
        for m, state in zip(live, states):
            m.state = state
        _end_of_step(live, done, metrics, shared, preempted.is_set())
        bar.update(1)
        _stop_if_preempted(live, done, preempted, run_dir)
        if any(m.failed for m in live):
            live = [m for m in live if not m.failed]
            step_fn = make_fused_step(live, mesh) if live else None


def run_sweep_command(data_dir: str, run_dir: str, pairs: list[str],
                      progress: bool = True) -> dict:
    """`sae-jax train DATA_DIR RUN_DIR` when `is_sweep(pairs)`: expands the grid, names the
    members and trains them in one pass (see `train_sweep`)."""
    grid = expand_grid(pairs)
    names = run_names(grid)
    return train_sweep([make_config(p) for p in grid], data_dir, run_dir, progress=progress,
                       names=names)
