"""Sharded training: the train state, the optimizer, one jitted step, and the loop.

The step is built once by `make_train_step` and compiled with explicit shardings:
params and Adam moments split on the dictionary axis, the batch on the data axis.
The loop around it only feeds batches, logs and checkpoints.
"""

from __future__ import annotations

import math
import signal
from functools import partial
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from sae_jax import saes
from sae_jax.config import TrainConfig
from sae_jax.data.loader import BatchSource, batches, estimate_stats, scale_and_mean, stats_sample
from sae_jax.data.store import open_store
from sae_jax.errors import Preempted, UserError
from sae_jax.interrupts import signal_flag
from sae_jax.mesh import batch_sharding, logical_to_sharding, make_mesh, replicated
from sae_jax.rundir import RunInfo, data_widths, prepare_run
from sae_jax.saes.common import LossContext, normalize_decoder, remove_parallel_grad
from sae_jax.training import checkpoint
from sae_jax.training.distributed import batch_share, host_value
from sae_jax.training.metrics import MetricsLog


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (saved whole in each checkpoint)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: saes.Params
    opt_state: optax.OptState
    steps_since_fired: jax.Array  # int32 (F,): for dead-latent tracking and AuxK


def learning_rate(cfg: TrainConfig):
    """Linear warm-up from 0, constant, then linear decay to 0 over the last `lr_decay`."""
    warm = max(1, round(cfg.lr_warmup * cfg.steps)) if cfg.lr_warmup else 0
    decay = max(1, round(cfg.lr_decay * cfg.steps)) if cfg.lr_decay else 0

    def schedule(count):
        t = count.astype(jnp.float32)
        up = jnp.minimum(1.0, (t + 1) / warm) if warm else 1.0
        down = jnp.clip((cfg.steps - t) / decay, 0.0, 1.0) if decay else 1.0
        return cfg.lr * up * down

    return schedule


def sparsity_coeff(cfg: TrainConfig, step) -> jax.Array:
    """The penalty weight at `step`: ramps linearly from 0 over `sparsity_warmup` of the run."""
    warm = cfg.sparsity_warmup * cfg.steps
    ramp = jnp.minimum(1.0, step.astype(jnp.float32) / warm) if warm >= 1 else 1.0
    return jnp.float32(cfg.sparsity_coeff) * ramp


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    return optax.chain(*clip, optax.adam(learning_rate(cfg), b1=cfg.beta1, b2=cfg.beta2))


def init_state(key, cfg: TrainConfig, d_in: int, data_mean, tx,
               d_out: int | None = None) -> TrainState:
    params = saes.init(key, cfg, d_in, data_mean, d_out)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      steps_since_fired=jnp.zeros((cfg.width,), jnp.int32))


def state_shardings(cfg: TrainConfig, d_in: int, tx, mesh: Mesh, d_out: int | None = None):
    """NamedShardings for every leaf of the train state.

    Params follow their logical axes; any optimizer sub-state shaped like the params (Adam's
    moments) mirrors them; counters are replicated.
    """
    shapes = jax.eval_shape(partial(init_state, cfg=cfg, d_in=d_in, data_mean=None, tx=tx,
                                    d_out=d_out), jax.random.key(0))
    param_sh = logical_to_sharding(saes.param_axes(cfg), mesh)
    params_tree = jax.tree.structure(shapes.params)

    def like_params(node):
        return jax.tree.structure(node) == params_tree

    opt_sh = jax.tree.map(lambda n: param_sh if like_params(n) else replicated(mesh),
                          shapes.opt_state, is_leaf=like_params)
    latent = logical_to_sharding(("latent",), mesh)
    return shapes, TrainState(step=replicated(mesh), params=param_sh, opt_state=opt_sh,
                              steps_since_fired=latent)


def make_train_step(cfg: TrainConfig, tx, mesh: Mesh | None, input_scale: float,
                    target_scale: float | None = None):
    """Returns the pure `train_step(state, x_raw) -> (state, metrics)`.

    Inside the step: scale the raw batch, take the loss gradient, drop the decoder's parallel
    gradient (unit-norm architectures), apply Adam, then re-normalise the decoder and update
    estimated buffers. Metrics are scalars. With `target_scale` (a transcoder) each raw row is
    the input (`d_in` columns) followed by the target, scaled by `target_scale`.
    """
    arch = saes.ARCHITECTURES[cfg.arch]
    dead_steps = math.ceil(cfg.dead_tokens / cfg.batch_size)

    def train_step(state: TrainState, x_raw):
        d_in = state.params["W_enc"].shape[0]
        x = x_raw[:, :d_in].astype(jnp.float32) * input_scale
        target = (None if target_scale is None else
                  x_raw[:, d_in:].astype(jnp.float32) * target_scale)
        dead = state.steps_since_fired >= dead_steps
        ctx = LossContext(sparsity_coeff(cfg, state.step), dead)
        grad_fn = jax.value_and_grad(saes.loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, x, cfg, ctx, mesh, target)
        if arch.unit_norm_decoder:
            grads = remove_parallel_grad(grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if arch.unit_norm_decoder:
            params = normalize_decoder(params)
        if arch.post_update:
            params = arch.post_update(params, metrics, cfg)
        fired = metrics.pop("fired")
        steps_since_fired = jnp.where(fired, 0, state.steps_since_fired + 1)
        metrics.update(lr=learning_rate(cfg)(state.step), sparsity_coeff=ctx.sparsity_coeff,
                       dead_frac=dead.mean(), grad_norm=optax.tree.norm(grads))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               steps_since_fired=steps_since_fired)
        return new_state, metrics

    return train_step


def compile_train_step(cfg: TrainConfig, tx, mesh: Mesh, state_sh, input_scale: float,
                       target_scale: float | None = None):
    """`jax.jit` of the step with explicit in/out shardings; the old state is donated."""
    step = make_train_step(cfg, tx, mesh, input_scale, target_scale)
    return jax.jit(step, in_shardings=(state_sh, batch_sharding(mesh)),
                   out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)


def check_mesh_fits(cfg: TrainConfig, mesh: Mesh) -> None:
    data, model = mesh.shape["data"], mesh.shape["model"]
    if cfg.batch_size % data:
        raise UserError(f"batch_size={cfg.batch_size} must be divisible by the data axis "
                        f"({data} devices)")
    if cfg.width % model:
        raise UserError(f"width={cfg.width} must be divisible by the model axis "
                        f"({model} devices)")


def init_or_restore(cfg: TrainConfig, run: RunInfo, mesh: Mesh, tx, mngr, train_rows):
    """The latest readable checkpoint if the run has one, else a fresh sharded state."""
    shapes, state_sh = state_shardings(cfg, run.d_in, tx, mesh, run.d_out)
    state = checkpoint.restore_latest_good(
        mngr, checkpoint.abstract_with_shardings(shapes, state_sh))
    if state is not None:
        return state, state_sh
    _, scaled_mean = estimate_stats(train_rows, reconstructed_columns(run))
    init = jax.jit(partial(init_state, cfg=cfg, d_in=run.d_in, tx=tx, d_out=run.d_out),
                   out_shardings=state_sh)
    return init(jax.random.key(cfg.seed), data_mean=scaled_mean), state_sh


def batch_feed(store, train_rows, cfg: TrainConfig, mesh: Mesh):
    """`(source, to_global)`: this process's share of every global batch of the training rows
    (a `BatchSource`; batch s is a pure function of (seed, s)), and the function that
    assembles a share into the global batch array sharded over `data`."""
    x_sharding = batch_sharding(mesh)
    share_index, share_count = batch_share(x_sharding, cfg.batch_size, store.d_in)
    source = BatchSource(train_rows, cfg.batch_size, cfg.seed, cfg.steps, share_index,
                         share_count, block_rows=store.meta.get("chunk_rows", 4096))

    def to_global(local_rows):
        return jax.make_array_from_process_local_data(
            x_sharding, local_rows, (cfg.batch_size, store.d_in))

    return source, to_global


def reconstructed_columns(run: RunInfo) -> slice:
    """The columns of a row the SAE reconstructs: all of them, or a transcoder's target."""
    return slice(None) if run.d_out is None else slice(run.d_in, None)


def estimate_scales(run_widths: tuple[int, int | None], train_rows):
    """The input scale, or a transcoder's `(input, target)` scales (see `estimate_stats`)."""
    d_in, d_out = run_widths
    if d_out is None:
        return estimate_stats(train_rows)[0]
    sample = stats_sample(train_rows)  # read once for both halves
    return scale_and_mean(sample[:, :d_in])[0], scale_and_mean(sample[:, d_in:])[0]


def sigterm_flag():
    """A flag set by SIGTERM (how Cloud TPU preemption arrives) while the block runs."""
    return signal_flag(signal.SIGTERM)


def train(cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path,
          progress: bool = True, devices: list | None = None) -> dict:
    """Trains (or resumes) the run in `run_dir` on the store in `data_dir`.

    Args:
      devices: devices for the mesh (default: all), e.g. a subset in tests.

    Returns:
      The metrics of the final logged step, as Python floats.

    Raises:
      UserError: bad input, or a NaN/Inf loss (nothing non-finite is checkpointed).
      Preempted: SIGTERM arrived; a checkpoint of the current step was saved first.
    """
    store = open_store(data_dir)
    devices = list(jax.devices()) if devices is None else list(devices)
    cfg, d_in, d_out = data_widths(cfg, store)
    cfg = cfg.for_devices(devices, d_in)
    train_rows, _ = store.split(cfg.holdout)
    run = prepare_run(run_dir, cfg, store, lambda: estimate_scales((d_in, d_out), train_rows),
                      (d_in, d_out))
    mesh = make_mesh(cfg.mesh, devices)
    check_mesh_fits(cfg, mesh)
    tx = make_optimizer(cfg)
    mngr = checkpoint.manager(run_dir, cfg)
    state, state_sh = init_or_restore(cfg, run, mesh, tx, mngr, train_rows)
    step_fn = compile_train_step(cfg, tx, mesh, state_sh, run.input_scale, run.target_scale)
    start = int(host_value(state.step))
    source, to_global = batch_feed(store, train_rows, cfg, mesh)
    log = MetricsLog(run_dir, cfg, start, progress=progress)
    last = {}
    try:
        with sigterm_flag() as preempted:
            for done, x in enumerate(batches(source, start), start + 1):
                state, metrics = step_fn(state, to_global(x))
                saving = done % cfg.ckpt_every == 0 or done == cfg.steps or preempted.is_set()
                if done % cfg.log_every == 0 or saving:
                    last = log.record(done, host_value(metrics))
                    if not np.isfinite(last["loss"]):
                        raise UserError(
                            f"loss is {last['loss']} at step {done}; stopping. The last good "
                            f"checkpoint (step {mngr.latest_step()}) is kept in {run_dir}")
                if saving:
                    checkpoint.save(mngr, done, state)
                if preempted.is_set():
                    mngr.wait_until_finished()
                    raise Preempted(f"SIGTERM at step {done}: checkpoint saved in {run_dir}; "
                                    "rerun the same command to resume")
    finally:
        mngr.wait_until_finished()
        mngr.close()
        log.close()
    return last
