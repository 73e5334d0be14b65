"""The train step: the train state, the optimizer, and one pure step jitted with shardings.

The step is built once by `make_train_step` and compiled with explicit shardings: params
and Adam moments split on the dictionary axis, the batch on the data axis. The loop around
it (`training.lifecycle`) only feeds batches, logs and checkpoints.
"""

from __future__ import annotations

import math
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sae_jax import saes, scales
from sae_jax.config import TrainConfig
from sae_jax.errors import UserError
from sae_jax.mesh import batch_sharding, logical_to_sharding, replicated
from sae_jax.saes import clt
from sae_jax.saes.common import LossContext, normalize_decoder, remove_parallel_grad
from sae_jax.scales import Scale


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (each checkpoint saves `params` as one item
    and the rest as another, so the params can be read alone)."""

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


def make_train_step(cfg: TrainConfig, tx, mesh: Mesh | None, input_scale: Scale,
                    target_scale: Scale | None = None):
    """Returns the pure `train_step(state, x_raw) -> (state, metrics)`.

    Inside the step: scale the raw batch, take the loss gradient, drop the decoder's parallel
    gradient (unit-norm architectures), apply Adam, then re-normalise the decoder and update
    estimated buffers. Metrics are scalars, among them `params_ok` (see `params_ok`: checked
    on device, so the loop refuses to save a broken state without fetching it). With
    `target_scale` (a transcoder) each raw row is the input (`d_in` columns) followed by the
    target, scaled by `target_scale`. A scale is a float or per-column (`sae_jax.scales`).
    """
    arch = saes.ARCHITECTURES[cfg.arch]
    input_scale = scales.multiplier(input_scale)
    target_scale = None if target_scale is None else scales.multiplier(target_scale)
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
                       dead_frac=dead.mean(), grad_norm=optax.tree.norm(grads),
                       params_ok=params_ok(params, x, cfg, mesh))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               steps_since_fired=steps_since_fired)
        return new_state, metrics

    return train_step


def params_ok(params, x, cfg: TrainConfig, mesh: Mesh | None) -> jax.Array:
    """1.0 if the updated params are fit to checkpoint, else 0.0 (a float32 scalar).

    Fit means every param is finite *and* the SAE reconstructs a probe of the batch (one row
    per data shard, so the probe keeps the batch's sharding) with a finite squared norm. A
    diverged step can leave finite but absurd weights (±1e30 after a huge learning rate)
    whose every use overflows; the probe catches those at the cost of a few rows' forward
    pass."""
    finite = jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(params)]).all()
    shards = mesh.shape["data"] if mesh is not None else 1
    probe = x.reshape(shards, -1, x.shape[-1])[:, 0, :]
    x_hat = saes.reconstruct(params, probe, cfg, mesh)
    return (finite & jnp.isfinite(jnp.sum(jnp.square(x_hat)))).astype(jnp.float32)


def compile_train_step(cfg: TrainConfig, tx, mesh: Mesh, state_sh, input_scale: Scale,
                       target_scale: Scale | None = None):
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
    layers = clt.n_layers(cfg) if clt.is_clt(cfg) else 1
    if (cfg.width // layers) % model:
        raise UserError(f"width/layers = {cfg.width // layers} (a CLT's latents per layer) "
                        f"must be divisible by the model axis ({model} devices)")
