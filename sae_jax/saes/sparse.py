"""Sparse codes: k (index, value) pairs per row instead of a dense (batch, F) matrix.

With k ≪ F only the encoder's forward pass needs a dense matmul (to rank the features).
The k selected pre-activations are read off it, and the decoder and every weight
gradient then touch only k rows per token:

* `selected_pre` has a hand-written VJP: its forward is a `take_along_axis` of the dense
  pre-activations, its backward scatter-adds `g ⊗ (x − b_dec)` into the chosen columns of
  `W_enc` (autodiff of the same gather would read `W_enc` column-wise, which on CPU costs
  as much as the dense matmul), and `b_dec` gets its gradient from one mat-vec.
* `decode` gathers the k decoder rows per token; autodiff turns that into a scatter-add.

**On a dictionary split over the "model" axis** every function here is a `shard_map` over
("data", "model"); indices are always global latent ids, rows stay on their data shard:

* `topk_indices`: each model shard ranks its own F/model latents (local top-k), the
  k-per-shard candidate values are all-gathered over "model" (batch × k·model numbers),
  every shard takes the global top-k of those (exact, because every global winner is a
  local winner on its own shard; ties still go to the lowest id), and the winners' ids,
  known to their own shard only, are assembled by a `psum` (batch × k integers).
* `selected_pre`, `take`: each shard reads the selected entries it owns and zeros the rest;
  a `psum` over "model" (batch × k numbers) assembles them. Its backward scatter-adds into
  the owning shard's `W_enc` columns only, and `psum`s over "data" (the usual gradient
  all-reduce).
* `decode`: each shard decodes the selected latents it owns (a partial x̂) and the partial
  decodes are `psum`med over "model" (batch × d numbers); autodiff of that shard_map sends
  `W_dec`'s gradient to the owning shard and all-reduces it over "data".

Each shard runs the k-wide work for every selected entry, masked where it does not own it,
so the sparse FLOPs are model × 10dk per token, negligible next to the 2dF encoder
(`planning.cost.step_flops_per_token`).
"""

from __future__ import annotations

import contextlib
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from sae_jax.saes import common

_DISABLED = False
_ROWS, _BLOCK = P("data", None), P("data", "model")


def usable(mesh: Mesh | None) -> bool:
    """Whether TopK training takes the sparse path: on every mesh, split dictionary or not,
    unless `disabled()` is in force (the dense reference)."""
    del mesh  # every mesh: a split dictionary runs the shard_map versions (module docstring)
    return not _DISABLED


def split(mesh: Mesh | None) -> bool:
    """Whether the dictionary is split over devices (the shard_map versions run)."""
    return mesh is not None and mesh.shape["model"] > 1


def gather_pays(k: int, d_in: int, width: int, mesh: Mesh | None) -> bool:
    """Whether k decoder rows per token should be gathered on a split dictionary: the
    (batch, k, d_in) buffers are whole on every model shard (each masks what it does not
    own), so past k·d_in > F/model they outgrow the dense (batch, F/model) path. AuxK asks
    (aux_k = d_in/2 by default: 2048·4096 floats per token at d = 4096); unsplit, always."""
    return not split(mesh) or k * d_in <= width // mesh.shape["model"]


@contextlib.contextmanager
def disabled():
    """Traces inside this block use the dense reference path (for benchmarks and tests)."""
    global _DISABLED
    previous, _DISABLED = _DISABLED, True
    try:
        yield
    finally:
        _DISABLED = previous


def topk_indices(scores: Float[Array, "batch F"], k: int,
                 mesh: Mesh | None = None) -> Int[Array, "batch k"]:
    """Global ids of each row's k largest scores, computed where the rows live (XLA would
    otherwise gather the whole batch onto every device for `top_k`)."""
    scores = lax.stop_gradient(scores)
    if mesh is None:
        return _top_k(scores, k)[1]
    if not split(mesh):
        return jax.shard_map(lambda s: _top_k(s, k)[1], mesh=mesh, in_specs=_ROWS,
                             out_specs=_ROWS)(scores)
    return jax.shard_map(lambda s: _sharded_top_k(s, k), mesh=mesh, in_specs=_BLOCK,
                         out_specs=_ROWS)(scores)


def _top_k(scores, k: int):
    """(values, indices) of the k largest per row. On TPU, `approx_max_k` (recall ≥ 0.95, a
    partial reduction the TPU runs far faster than a sort); elsewhere exact `top_k`."""
    if jax.default_backend() == "tpu":
        return lax.approx_max_k(scores, k, recall_target=0.95)
    return lax.top_k(scores, k)


def _sharded_top_k(scores, k: int):
    """shard_map body: `scores` is this device's (batch/data, F/model) block."""
    width = scores.shape[1]
    k_local = min(k, width)
    values, idx = _top_k(scores, k_local)
    candidates = lax.all_gather(values, "model", axis=1, tiled=True, to="invarying")
    pos = lax.top_k(candidates, k)[1]
    shard = lax.axis_index("model")
    mine = pos // k_local == shard  # winners this shard proposed: it alone knows their ids
    ids = jnp.take_along_axis(idx, pos % k_local, axis=1) + shard * width
    return lax.psum(jnp.where(mine, ids, 0), "model")


def _owned(idx, width: int):
    """shard_map body: (this shard's local index, whether it owns the latent) of global
    ids `idx`; not-owned entries point at local latent 0 and must be masked."""
    local = idx - lax.axis_index("model") * width
    mine = (local >= 0) & (local < width)
    return jnp.where(mine, local, 0), mine


def _take_owned(block, idx):
    """shard_map body: `block[b, idx[b, j]]` assembled over the model shards."""
    local, mine = _owned(idx, block.shape[1])
    return lax.psum(jnp.where(mine, jnp.take_along_axis(block, local, axis=1), 0), "model")


def take(scores: Float[Array, "batch F"], idx: Int[Array, "batch k"],
         mesh: Mesh | None = None) -> Float[Array, "batch k"]:
    """`scores[b, idx[b, j]]` without a gradient, wherever the latents live."""
    scores = lax.stop_gradient(scores)
    if not split(mesh):
        return jnp.take_along_axis(scores, idx, axis=1)
    return jax.shard_map(_take_owned, mesh=mesh, in_specs=(_BLOCK, _ROWS),
                         out_specs=_ROWS)(scores, idx)


def selected_pre(pre, x, b_dec, W_enc, b_enc, idx, mesh: Mesh | None = None
                 ) -> Float[Array, "batch k"]:
    """`pre[b, idx[b, j]]`, where `pre = (x − b_dec) @ W_enc + b_enc`, differentiable in the
    weights with sparse gradients. `pre` itself receives no gradient. (`b_dec` is the
    encoder's centre, `common.encoder_center`: zeros for a transcoder.)"""
    return _selected_pre(mesh if split(mesh) else None, pre, x, b_dec, W_enc, b_enc, idx)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _selected_pre(mesh, pre, x, b_dec, W_enc, b_enc, idx):
    return take(pre, idx, mesh)


def _selected_pre_fwd(mesh, pre, x, b_dec, W_enc, b_enc, idx):
    return _selected_pre(mesh, pre, x, b_dec, W_enc, b_enc, idx), (x, b_dec, W_enc, idx)


def _scatter_grads(g, centred, idx, W_enc):
    """(dW_enc, db_enc) of the selected entries `idx` (local ids) with cotangent `g`: the
    outer products scatter-added into the chosen columns only."""
    d_in, width = W_enc.shape
    flat = idx.reshape(-1)
    outer = (g[:, :, None] * centred[:, None, :]).reshape(-1, d_in)
    dW_enc = jnp.zeros((width, d_in), jnp.float32).at[flat].add(outer).T
    db_enc = jnp.zeros((width,), jnp.float32).at[flat].add(g.reshape(-1))
    return dW_enc, db_enc


def _sharded_scatter_grads(g, x, b_dec, W_enc, idx):
    """shard_map body of the backward: this shard's columns, summed over the data shards."""
    local, mine = _owned(idx, W_enc.shape[1])
    dW_enc, db_enc = _scatter_grads(jnp.where(mine, g, 0.0), x - b_dec, local, W_enc)
    dW_enc, db_enc = lax.psum(dW_enc, "data"), lax.psum(db_enc, "data")
    return dW_enc, db_enc, lax.psum(-(W_enc @ db_enc), "model")


def _selected_pre_bwd(mesh, residuals, g):
    x, b_dec, W_enc, idx = residuals
    g = g.astype(jnp.float32)
    if mesh is None:
        dW_enc, db_enc = _scatter_grads(g, x - b_dec, idx, W_enc)
        db_dec = -(W_enc @ db_enc)
    else:
        dW_enc, db_enc, db_dec = jax.shard_map(
            _sharded_scatter_grads, mesh=mesh, in_specs=(_ROWS, _ROWS, P(), P(None, "model"),
                                                         _ROWS),
            out_specs=(P(None, "model"), P("model"), P()))(g, x, b_dec, W_enc, idx)
    return None, None, db_dec, dW_enc, db_enc, None


_selected_pre.defvjp(_selected_pre_fwd, _selected_pre_bwd)


def _decode_rows(W_dec, values, idx, dtype) -> Float[Array, "batch d_in"]:
    return jnp.einsum("bk,bkd->bd", values.astype(dtype), W_dec[idx].astype(dtype),
                      preferred_element_type=jnp.float32)


def _decode_owned(W_dec, values, idx, dtype):
    """shard_map body: this shard's partial decode, summed over the model shards."""
    local, mine = _owned(idx, W_dec.shape[0])
    return lax.psum(_decode_rows(W_dec, jnp.where(mine, values, 0.0), local, dtype), "model")


def decode(W_dec, values: Float[Array, "batch k"], idx: Int[Array, "batch k"],
           compute_dtype: str, mesh: Mesh | None = None) -> Float[Array, "batch d_in"]:
    """Σ_j values[b, j] · W_dec[idx[b, j]] (no bias), in `compute_dtype`, float32 out."""
    dtype = common.compute_dtype(compute_dtype)
    if not split(mesh):
        return _decode_rows(W_dec, values, idx, dtype)
    return jax.shard_map(partial(_decode_owned, dtype=dtype), mesh=mesh,
                         in_specs=(P("model", None), _ROWS, _ROWS),
                         out_specs=_ROWS)(W_dec, values, idx)


def model_axis_bytes(d_in: int, k: int, model: int) -> int:
    """Payload bytes per token over the model axis of the split sparse TopK step (0
    unsplit): the k·model candidate values all-gathered, then the winners' ids, their
    pre-activations, the partial decodes (d) and, backward, the values' cotangent psummed.
    AuxK steps add the same with aux_k; the data-axis gradient all-reduce is the dense one."""
    return 0 if model == 1 else 4 * k * model + 12 * k + 4 * d_in


def fired(values: Float[Array, "batch k"], idx: Int[Array, "batch k"], width: int):
    """(F,) bool: which features were active in some row."""
    return jnp.zeros((width,), bool).at[idx.reshape(-1)].max(values.reshape(-1) > 0)
