"""What every SAE architecture shares: the params layout, encoder/decoder matmuls, and the
decoder-norm helpers.

Params are a plain dict (SAELens names and layouts, so export is a rename):
`W_enc (d_in, F)`, `b_enc (F,)`, `W_dec (F, d_in)`, `b_dec (d_in,)`, plus whatever an
architecture adds. Inputs here are already scaled (E‖x‖² = d_in); see `sae_jax.rundir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Float

from sae_jax.mesh import logical_to_spec

Params = dict[str, Array]

_BASELINE = False


@contextlib.contextmanager
def baseline():
    """Traces inside this block build the step as it was before the step-speed work (issue
    20): b_dec's encoder gradient as a dense matmul, the sparse decode through a gathered
    (batch, k, d) array. `sae-jax bench` times both in one run; tests compare them."""
    global _BASELINE
    previous, _BASELINE = _BASELINE, True
    try:
        yield
    finally:
        _BASELINE = previous


def is_baseline() -> bool:
    return _BASELINE

BASE_AXES: dict[str, tuple[str, ...]] = {
    "W_enc": ("embed", "latent"),
    "b_enc": ("latent",),
    "W_dec": ("latent", "embed"),
    "b_dec": ("embed",),
}


class Code(NamedTuple):
    """An encoder's output: pre-activations, activations, and scalar statistics.

    Dense codes have `f` of shape (batch, F) and `idx=None`. Sparse codes (TopK training,
    `saes.sparse`) have `f` of shape (batch, k): the values of features `idx` (batch, k).
    Flat sparse codes (BatchTopK training, `saes.batch_sparse`) have `f`, `idx` and `rows`
    of shape (n,): entry j is feature `idx[j]` of row `rows[j]` (local to its data shard).
    """

    pre: Float[Array, "batch F"]
    f: Float[Array, "batch _"]
    stats: dict[str, Array]
    idx: Array | None = None
    rows: Array | None = None

    def per_feature(self, weights: Float[Array, " F"]) -> Float[Array, "batch _"]:
        """`weights` (one per feature) aligned with `f`, dense or sparse."""
        return weights if self.idx is None else weights[self.idx]


class LossContext(NamedTuple):
    """Step-dependent inputs of the loss: the penalty weight now, and which latents are dead."""

    sparsity_coeff: Float[Array, ""]
    dead: Array  # bool (F,)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One SAE architecture: how to initialise, encode and (optionally) regularise it.

    Attributes:
      name: registry key (`arch=` in the config).
      init: `(key, cfg, d_in, data_mean) -> Params`.
      encode: `(params, x, cfg, mesh) -> Code`, the inference encoder.
      train_encode: encoder used in the training loss (default: `encode`).
      aux_loss: `(params, x, target, x_hat, code, ctx, cfg, mesh) -> scalar` extra loss,
        weighted by `aux_coeff` (e.g. AuxK).
      reconstruction_terms: `(params, code, target, base, cfg, mesh) -> (scalar, metrics)`,
        reconstruction losses added with weight 1 to the full one (Matryoshka's prefixes);
        `base` is the feature-free part of x̂ (b_dec, plus the skip term of a transcoder).
      post_update: `(params, code_stats, cfg) -> params`, applied after each optimizer update.
      extra_axes: logical axes of params beyond the four base ones. A param the training
        loss does not use (an estimated buffer) gets zero gradients, so Adam leaves it to
        `post_update`.
      unit_norm_decoder: keep decoder rows at unit norm (and drop the parallel gradient).
      defaults: config values this architecture recommends for keys left at None.
      check: `(cfg) -> None`, raises `UserError` for config values it cannot use.
      crosscoder: the row is several sources side by side (`cfg.sources`), and the
        sparsity penalty weighs each latent by its per-source decoder norms
        (`saes.crosscoder`; a CLT's sources are its input blocks then its target blocks).
      decoder_mask: `(cfg, d_out) -> (F, d_out)` of 0/1: decoder entries that must stay
        exactly zero (a CLT's causal blocks, `saes.clt`). They start at zero and the loss
        reads `W_dec` through the mask, so their gradient, and hence every update, is zero.
    """

    name: str
    init: Callable
    encode: Callable
    defaults: dict[str, Any]
    train_encode: Callable | None = None
    aux_loss: Callable | None = None
    reconstruction_terms: Callable | None = None
    post_update: Callable | None = None
    extra_axes: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    unit_norm_decoder: bool = False
    check: Callable | None = None
    crosscoder: bool = False
    decoder_mask: Callable | None = None

    def param_axes(self) -> dict[str, tuple[str, ...]]:
        return {**BASE_AXES, **self.extra_axes}


def constrain(x: Array, mesh: Mesh | None, axes: tuple[str | None, ...]) -> Array:
    """Pins `x` to the sharding of its logical axes on `mesh` (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes)))


def compute_dtype(name: str) -> jnp.dtype:
    """The matmul input dtype for a config's `compute_dtype`. The trainer resolves `auto`
    per backend; unresolved (pure functions called directly), it means float32."""
    return jnp.dtype("float32" if name == "auto" else name)


def matmul(a: Array, b: Array, compute_dtype_name: str) -> Float[Array, "..."]:
    """`a @ b` with inputs cast to the compute dtype and float32 accumulation/output; in a
    low-precision compute dtype its two backward matmuls run in that dtype too."""
    dtype = compute_dtype(compute_dtype_name)
    if dtype == jnp.float32:
        return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
    return _low_precision_matmul(a.astype(dtype), b.astype(dtype))


@jax.custom_vjp
def _low_precision_matmul(a, b):
    """bf16 × bf16 → f32. Autodiff of this would transpose into f32 × f32 matmuls (the f32
    cotangent promotes the bf16 operand), so two thirds of a train step's matmul FLOPs
    would miss the bf16 rate; the VJP below rounds the cotangent to bf16 first, as mixed-
    precision training does, and lets JAX's own transpose rules place the shardings."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _low_precision_matmul_fwd(a, b):
    return _low_precision_matmul(a, b), (a, b)


def _low_precision_matmul_bwd(operands, g):
    a, b = operands
    _, transpose = jax.vjp(jnp.matmul, a, b)
    return transpose(g.astype(a.dtype))


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def centered_matmul(x, center, W, compute_dtype_name: str) -> Float[Array, "batch F"]:
    """`(x − center) @ W` (the encoder: `center` is b_dec) whose gradient for `center` is
    one mat-vec, `−(Σ_b g) @ Wᵀ`, where autodiff would run a (batch, F) × (F, d) matmul
    (2·d·F FLOPs per token, a sixth of a dense step) only to sum its rows. The forward
    and the W gradient are `matmul`'s, bf16 included."""
    if _BASELINE:
        return matmul(x - center, W, compute_dtype_name)
    return _centered_matmul(x, center, W, compute_dtype_name)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _centered_matmul(x, center, W, compute_dtype_name):
    return matmul(x - center, W, compute_dtype_name)


def _centered_matmul_fwd(x, center, W, compute_dtype_name):
    return _centered_matmul(x, center, W, compute_dtype_name), (x - center, W)


def _centered_matmul_bwd(compute_dtype_name, residuals, g):
    x_in, W = residuals
    _, transpose = jax.vjp(lambda a, w: matmul(a, w, compute_dtype_name), x_in, W)
    dx, dW = transpose(g)  # dx is dropped by XLA unless x itself is differentiated
    dcenter = -(W.astype(jnp.float32) @ jnp.sum(g, axis=0, dtype=jnp.float32))
    return dx, dcenter.astype(x_in.dtype), dW


_centered_matmul.defvjp(_centered_matmul_fwd, _centered_matmul_bwd)


def init_dictionary(key, d_in: int, width: int, row_norm: float, data_mean=None) -> Params:
    """Random decoder directions of norm `row_norm`, `W_enc = W_decᵀ`, `b_dec` = data mean.

    Tied initialisation (Anthropic, April 2024; OpenAI TopK) starts every feature as a
    matched encoder/decoder pair, which cuts dead features early in training.
    """
    W_dec = jax.random.normal(key, (width, d_in), jnp.float32)
    W_dec = row_norm * W_dec / jnp.linalg.norm(W_dec, axis=1, keepdims=True)
    b_dec = jnp.zeros((d_in,), jnp.float32) if data_mean is None else jnp.asarray(
        data_mean, jnp.float32)
    return {"W_enc": W_dec.T, "b_enc": jnp.zeros((width,), jnp.float32), "W_dec": W_dec,
            "b_dec": b_dec}


def encoder_center(params: Params, cfg) -> Float[Array, " d_in"]:
    """What the encoder subtracts from its input: `b_dec` for an SAE (input and output share
    one space), zeros for a transcoder (its `b_dec` lives in the target space; SAELens's
    transcoders likewise skip it)."""
    if cfg.transcoder:
        return jnp.zeros(params["W_enc"].shape[:1], jnp.float32)
    return params["b_dec"]


def pre_activations(params: Params, x, cfg, mesh: Mesh | None) -> Float[Array, "batch F"]:
    """`(x - b_dec) @ W_enc + b_enc`, sharded (batch over data, features over model)."""
    pre = centered_matmul(x, encoder_center(params, cfg), params["W_enc"],
                          cfg.compute_dtype) + params["b_enc"]
    return constrain(pre, mesh, ("batch", "latent"))


def decode(params: Params, f, compute_dtype: str = "float32", mesh: Mesh | None = None):
    """`f @ W_dec + b_dec`: the reconstruction in scaled-input units."""
    x_hat = matmul(f, params["W_dec"], compute_dtype) + params["b_dec"]
    return constrain(x_hat, mesh, ("batch", "embed"))


def skip(params: Params, x, cfg) -> Float[Array, "batch d_out"] | float:
    """A skip transcoder's linear path `x @ W_skipᵀ` (SAELens's `(d_out, d_in)` layout); 0
    for everything else."""
    if "W_skip" not in params:
        return 0.0
    return matmul(x, params["W_skip"].T, cfg.compute_dtype)


def transcoder_params(key, params: Params, d_out: int, target_mean, skip_connection: bool,
                      mask=None):
    """Turns freshly initialised SAE params into a transcoder's: decoder rows of the same
    norms in the target space (zero where `mask`, `Architecture.decoder_mask`, is 0),
    `b_dec` at the target mean, `W_skip` at zero (so training starts from the plain
    transcoder, as SAELens's `SkipTranscoder` does)."""
    norms = decoder_norms(params)[:, None]
    W_dec = jax.random.normal(key, (params["W_dec"].shape[0], d_out), jnp.float32)
    W_dec = W_dec if mask is None else W_dec * mask
    W_dec = norms * W_dec / jnp.linalg.norm(W_dec, axis=1, keepdims=True)
    b_dec = jnp.zeros((d_out,), jnp.float32) if target_mean is None else jnp.asarray(
        target_mean, jnp.float32)
    params = {**params, "W_dec": W_dec, "b_dec": b_dec}
    if skip_connection:
        params["W_skip"] = jnp.zeros((d_out, params["W_enc"].shape[0]), jnp.float32)
    return params


def decoder_norms(params: Params) -> Float[Array, " F"]:
    return jnp.linalg.norm(params["W_dec"], axis=1)


def source_norms(W_dec, widths: tuple[int, ...]) -> Float[Array, "F S"]:
    """‖W_dec,i^s‖ for every latent i and source s, the sources being consecutive column
    blocks of the given widths (a crosscoder's per-source decoders).

    The square root is floored at a tiny value so that a source block the penalty has driven
    to exactly zero has a zero gradient, not NaN."""
    bounds = [0, *itertools.accumulate(widths)]
    squares = [jnp.sum(jnp.square(W_dec[:, a:b]), axis=1) for a, b in zip(bounds, bounds[1:])]
    return jnp.sqrt(jnp.maximum(jnp.stack(squares, axis=1), 1e-30))


def decoder_blocks(cfg) -> tuple[int, ...] | None:
    """The widths of `W_dec`'s column blocks: a crosscoder's sources, a CLT's target blocks
    (the second half of its sources: a transcoder's decoder writes the target only)."""
    widths = getattr(cfg, "sources", None)
    if not widths:
        return None
    return tuple(widths[len(widths) // 2:]) if cfg.transcoder else tuple(widths)


def penalty_norms(params: Params, cfg) -> Float[Array, " F"]:
    """What each latent's activation is multiplied by in the sparsity penalty: its decoder
    norm, or for a crosscoder (or CLT) with `crosscoder_norm=sum` the sum of its per-source
    (per-target-layer) decoder norms (Lindsey et al. 2024), which makes a latent pay for
    every source it writes to."""
    widths = decoder_blocks(cfg)
    if not widths or len(widths) == 1 or cfg.crosscoder_norm == "l2":
        return decoder_norms(params)
    return source_norms(params["W_dec"], widths).sum(axis=1)


def normalize_decoder(params: Params) -> Params:
    """Rescales decoder rows to unit norm."""
    W_dec = params["W_dec"] / jnp.maximum(decoder_norms(params), 1e-8)[:, None]
    return {**params, "W_dec": W_dec}


def remove_parallel_grad(grads: Params, params: Params) -> Params:
    """Drops the part of each decoder row's gradient that would only change its norm.

    With unit-norm rows re-imposed after every step, that component is wasted and fights
    Adam's moment estimates (OpenAI TopK SAEs, sparsify).
    """
    W = params["W_dec"] / jnp.maximum(decoder_norms(params), 1e-8)[:, None]
    g = grads["W_dec"]
    return {**grads, "W_dec": g - jnp.sum(g * W, axis=1, keepdims=True) * W}


def squared_error(x, x_hat) -> Float[Array, " batch"]:
    """Per-row ‖x - x̂‖² in float32."""
    return jnp.sum(jnp.square(x.astype(jnp.float32) - x_hat), axis=-1)
