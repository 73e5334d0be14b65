"""The life of a run, shared by a single run and a sweep: open, step, end of step, shut down.

A single `train` is a sweep of one member whose failure ends the command. Both go through
the same code: `open_member` (lease, run record, checkpoint manager, state restored or
initialised), `train_members` (one batch per step for every live member, then
`end_of_step`: log, check, checkpoint, SIGTERM), and the caller's `ExitStack`, which
shuts down what `open_member` opened (pending saves finished, managers and logs closed,
leases released). The one difference is the caller's `on_failure`: a sweep goes on when
one member's loss or params become unfit, a single run stops (nothing else could go on).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import shutil
import signal
import sys
from dataclasses import dataclass, field

import jax
import numpy as np
from tqdm import tqdm

from sae_jax import files
from sae_jax.config import TrainConfig
from sae_jax.data.loader import BatchSource, batches
from sae_jax.errors import Preempted, UserError
from sae_jax.interrupts import signal_flag
from sae_jax.mesh import batch_sharding, replicated
from sae_jax.rundir import RunInfo, prepare_run, read_data_stats
from sae_jax.training import checkpoint, stacked
from sae_jax.training.distributed import batch_share, host_value
from sae_jax.training.metrics import MetricsLog
from sae_jax.training.runlock import RunLock
from sae_jax.training.step import (
    init_state,
    make_optimizer,
    make_train_step,
    state_shardings,
)


@dataclass
class Member:
    """One run being trained, and what its loop needs."""

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
    lock: RunLock | None = None
    last: dict = field(default_factory=dict)
    failed: str | None = None


def data_stats_once(train_rows, widths: tuple[int, int | None]):
    """A function that reads the data statistics the first time it is called and returns the
    same `DataStats` ever after: a resumed run never reads them, a sweep reads them once."""
    return functools.cache(lambda: read_data_stats(train_rows, *widths))


def init_or_restore(cfg: TrainConfig, run: RunInfo, mesh, tx, mngr, stats):
    """The latest good checkpoint if the run has one, else a fresh sharded state whose
    decoder bias starts at the data mean (`stats()`, read only here)."""
    shapes, state_sh = state_shardings(cfg, run.d_in, tx, mesh, run.d_out)
    state = checkpoint.restore_latest_good(
        mngr, checkpoint.abstract_with_shardings(shapes, state_sh))
    if state is not None:
        return state, state_sh
    init = jax.jit(functools.partial(init_state, cfg=cfg, d_in=run.d_in, tx=tx,
                                     d_out=run.d_out), out_shardings=state_sh)
    return init(jax.random.key(cfg.seed), data_mean=run.scaled_mean(stats())), state_sh


def batch_feed(store, train_rows, cfg: TrainConfig, mesh):
    """`(source, to_global)`: this process's share of every global batch of the training rows
    (a `BatchSource`; batch s is a pure function of (data_seed, s)), and the function that
    assembles a share into the global batch array sharded over `data`."""
    x_sharding = batch_sharding(mesh)
    if cfg.batch_size > len(train_rows):
        raise UserError(f"batch_size={cfg.batch_size} is larger than the {len(train_rows)} "
                        "training rows of the store; use a smaller batch_size")
    share_index, share_count = batch_share(x_sharding, cfg.batch_size, store.d_in)
    source = BatchSource(train_rows, cfg.batch_size, cfg.data_seed, cfg.steps, share_index,
                         share_count, block_rows=store.chunk_rows)

    def to_global(local_rows):
        return jax.make_array_from_process_local_data(
            x_sharding, local_rows, (cfg.batch_size, store.d_in))

    return source, to_global


def open_member(name: str, cfg: TrainConfig, run_dir, store, mesh, stats,
                widths: tuple[int, int | None], progress: bool,
                stack: contextlib.ExitStack) -> Member:
    """Takes the run's lease, writes or checks its record, restores or initialises its state.

    Everything opened is registered on `stack`, so a failure while opening later members
    still releases this one's lease and checkpoint manager."""
    files.ensure_writable_dir(run_dir, "the run")
    lock = stack.enter_context(RunLock(run_dir)) if jax.process_index() == 0 else None
    mngr = checkpoint.manager(run_dir, cfg)
    stack.callback(_close_manager, mngr)
    ever_saved = bool(mngr.all_steps()) or checkpoint.has_quarantined(mngr)
    run = prepare_run(run_dir, cfg, store, stats, widths, has_checkpoints=ever_saved)
    tx = make_optimizer(cfg)
    state, state_sh = init_or_restore(cfg, run, mesh, tx, mngr, stats)
    start = int(host_value(state.step))
    log = MetricsLog(run_dir, cfg, start, progress=progress)
    stack.callback(log.close)
    return Member(name, str(run_dir), cfg, run, tx, mngr, state, state_sh, log, start, lock)


def _close_manager(mngr) -> None:
    mngr.wait_until_finished()
    mngr.close()


class GroupedStep:
    """One compiled step for `members` on one batch: with `batch`, each group of members
    that `stacked.batch_groups` finds batchable is one vmapped step over its stacked states;
    every other member runs its own step. Old states are donated; without `batch` (or for a
    lone member) this is exactly each member's own step, fused in one program.

    Between `sync` calls the members' `state` fields are stale (for a batched group, None):
    `sync` before a checkpoint or before dropping a member."""

    def __init__(self, members: list[Member], mesh, batch: bool = False):
        self.members = members
        scales = [(m.run.input_scale, m.run.target_scale) for m in members]
        self.groups = (stacked.batch_groups([m.cfg for m in members], scales) if batch
                       else [[i] for i in range(len(members))])
        carry_sh, steps = [], []
        for group in self.groups:
            m = members[group[0]]
            if len(group) == 1:
                carry_sh.append(m.state_sh)
                steps.append(make_train_step(m.cfg, m.tx, mesh, m.run.input_scale,
                                             m.run.target_scale))
            else:
                carry_sh.append(jax.tree.map(stacked.stacked_sharding, m.state_sh))
                steps.append(stacked.make_group_step([members[i].cfg for i in group], mesh,
                                                     m.run.input_scale, m.run.target_scale))
        groups, carry_sh = self.groups, tuple(carry_sh)

        def step_all(carries, x):
            outs = [step(carry, x) for step, carry in zip(steps, carries)]
            metrics = [None] * len(members)
            for group, (_, values) in zip(groups, outs):
                for j, i in enumerate(group):
                    metrics[i] = values if len(group) == 1 else {k: v[j]
                                                                 for k, v in values.items()}
            return tuple(o[0] for o in outs), tuple(metrics)

        self.step = CompiledStep(jax.jit(step_all, in_shardings=(carry_sh, batch_sharding(mesh)),
                                         out_shardings=(carry_sh, replicated(mesh)),
                                         donate_argnums=0))
        self.carries = tuple(
            members[g[0]].state if len(g) == 1
            else stacked.stack_states([members[i].state for i in g], sh)
            for g, sh in zip(self.groups, carry_sh))
        for i in (i for g in self.groups if len(g) > 1 for i in g):
            members[i].state = None  # its arrays now live in the stacked state only

    def __call__(self, x):
        """Steps every member on the global batch `x`; returns the per-member metrics."""
        self.carries, metrics = self.step(self.carries, x)
        return metrics

    def sync(self) -> None:
        """Sets every member's `state` to its current own (unstacked) state."""
        for group, carry in zip(self.groups, self.carries):
            states = ((carry,) if len(group) == 1 else stacked.unstack_states(
                carry, tuple(self.members[i].state_sh for i in group)))
            for i, state in zip(group, states):
                self.members[i].state = state


class CompiledStep:
    """A jitted step compiled ahead of time on its first call: later calls run that one
    executable (a batch of another shape is an error, never a silent recompile), and the
    compiled program's memory analysis is logged once."""

    def __init__(self, jitted):
        self.jitted, self.compiled = jitted, None

    def __call__(self, states, x):
        if self.compiled is None:
            self.compiled = self.jitted.lower(states, x).compile()
            log_memory(self.compiled)
        return self.compiled(states, x)


def log_memory(compiled) -> None:
    """One stderr line with XLA's per-device memory analysis of the compiled step."""
    stats = compiled.memory_analysis()
    if stats is None or jax.process_index() != 0:
        return
    mib = 1 << 20
    tqdm.write(f"sae-jax: train step compiled; per device: "
               f"{stats.argument_size_in_bytes / mib:.1f} MiB arguments, "
               f"{stats.temp_size_in_bytes / mib:.1f} MiB temporaries, "
               f"{stats.output_size_in_bytes / mib:.1f} MiB outputs "
               f"({stats.alias_size_in_bytes / mib:.1f} MiB donated)", file=sys.stderr)


def saves_at(done: int, cfg: TrainConfig, stop: bool) -> bool:
    """Whether step `done` ends with a checkpoint: every `ckpt_every`, the last, a stop."""
    return done % cfg.ckpt_every == 0 or done == cfg.steps or stop


def end_of_step(live: list[Member], done: int, metrics, cfg: TrainConfig, stop: bool) -> None:
    """After step `done`, for every live member: log at log steps and before saves; mark a
    member failed if its loss is non-finite or its updated params are unfit (`step.params_ok`),
    so nothing broken is ever checkpointed; checkpoint the others at checkpoint steps, the
    last step, or when stopping."""
    saving = saves_at(done, cfg, stop)
    if done % cfg.log_every == 0 or saving:
        for m, values in zip(live, host_value(metrics)):
            values = dict(values)
            fit = bool(values.pop("params_ok"))
            m.last = m.log.record(done, values)
            what = (f"loss is {m.last['loss']}" if not np.isfinite(m.last["loss"]) else
                    None if fit else "the updated params are not finite (or overflow on use)")
            if what:
                m.failed = (f"{what} at step {done}; the last good checkpoint (step "
                            f"{m.mngr.latest_step()}) is kept in {m.run_dir}")
    if saving:
        for m in live:
            if not m.failed:
                check_space_for_checkpoint(m, done)
                checkpoint.save(m.mngr, done, m.state)
    for m in live:
        if m.lock is not None:
            m.lock.check()


MAX_STEPS_IN_FLIGHT = 4
"""How many dispatched steps may be unfinished before the loop waits for the oldest.

Unbounded run-ahead deadlocks XLA:CPU: it launches each device's share of a step from one
thread pool of max(cores, devices) threads, a launch blocks its thread while its device has
32 computations in flight, and a step's all-reduce needs a thread for every device at once.
With 8 devices on a 2-core host, a loop many steps ahead leaves launches of later steps
holding the threads the current step's last participants need ("Termination timeout for all
reduce"). A few steps of lead still overlap the host's batch loading with device work."""


class StepWindow:
    """Bounds the steps in flight: `add` each step's metrics right after dispatching it."""

    def __init__(self, limit: int = MAX_STEPS_IN_FLIGHT):
        self.limit, self.pending = limit, collections.deque()

    def add(self, metrics) -> None:
        """Records a dispatched step by an output it never donates (its metrics), then waits
        until at most `limit` recorded steps are unfinished."""
        self.pending.append(metrics)
        while len(self.pending) > self.limit:
            jax.block_until_ready(self.pending.popleft())


def check_space_for_checkpoint(m: Member, step: int) -> None:
    """Refuses a save that cannot fit on a local disk, before anything is written: a save
    that fills the disk halfway fails in Orbax's background threads with pages of noise.
    Needs room for the whole state (retention deletes older checkpoints only after a new
    one has committed)."""
    if files.is_remote(m.run_dir):
        return
    need = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(m.state))
    free = shutil.disk_usage(m.run_dir).free
    if free < 1.05 * need + (1 << 20):
        latest = m.mngr.latest_step()
        kept = "nothing was saved yet" if latest is None else f"checkpoint {latest} is kept"
        raise UserError(f"no space left on device for checkpoint {step} of {m.run_dir}: it "
                        f"needs {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; free "
                        f"some space and rerun ({kept})")


def stop_if_preempted(live: list[Member], done: int, preempted, where) -> None:
    if preempted.is_set():
        for m in live:
            m.mngr.wait_until_finished()
        what = "checkpoint" if len(live) == 1 else "checkpoints"
        raise Preempted(f"SIGTERM at step {done}: {what} saved in {where}; rerun the same "
                        "command to resume")


def catch_up(members: list[Member], mesh, source, to_global, until: int, cfg: TrainConfig,
             preempted, on_failure) -> None:
    """Advances members that resumed from an older checkpoint to step `until`, each with its
    own step on the very batches the others saw (batch `s` is a pure function of `s`)."""
    for m in members:
        if m.start >= until:
            continue
        step_fn, in_flight = GroupedStep([m], mesh), StepWindow()
        for done in range(m.start + 1, until + 1):
            metrics = step_fn(to_global(source[done - 1]))
            in_flight.add(metrics)
            step_fn.sync()
            end_of_step([m], done, metrics, cfg, preempted.is_set())
            stop_if_preempted([m], done, preempted, m.run_dir)
            if m.failed:
                on_failure(m)
                break
        m.start = until


def train_members(members: list[Member], mesh, source, to_global, start: int,
                  cfg: TrainConfig, where, on_failure, bar=None, batch: bool = False) -> None:
    """The one-pass loop: one batch per step for all live members, from step `start`.

    Args:
      cfg: the config the members share (steps, log and checkpoint intervals).
      on_failure: called with a member whose loss or params became unfit; the member
        stops, the others go on (unless `on_failure` raises).
      bar: a progress bar to advance per step (a single run's bar is its `MetricsLog`'s).
      batch: step equal-shape members as one vmapped step (`stacked`; a resumed member
        catches up on its own first).
    """
    with signal_flag(signal.SIGTERM) as preempted:
        catch_up(members, mesh, source, to_global, start, cfg, preempted, on_failure)
        live = [m for m in members if m.start < cfg.steps and not m.failed]
        step_fn = GroupedStep(live, mesh, batch) if live else None
        in_flight = StepWindow()
        for done, x in enumerate(batches(source, start), start + 1):
            if not live:
                break
            metrics = step_fn(to_global(x))
            in_flight.add(metrics)
            stop = preempted.is_set()
            if saves_at(done, cfg, stop):
                step_fn.sync()
            end_of_step(live, done, metrics, cfg, stop)
            if bar is not None:
                bar.update(1)
            stop_if_preempted(live, done, preempted, where)
            failed = [m for m in live if m.failed]
            if failed:
                step_fn.sync()
                for m in failed:
                    on_failure(m)
                live = [m for m in live if not m.failed]
                step_fn = GroupedStep(live, mesh, batch) if live else None


__all__ = ["Member", "batch_feed", "catch_up", "data_stats_once",
           "end_of_step", "GroupedStep", "init_or_restore", "open_member", "stop_if_preempted",
           "train_members"]
