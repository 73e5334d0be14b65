"""Sparse codes: k (index, value) pairs per row instead of a dense (batch, F) matrix.

With k ≪ F only the encoder's forward pass needs a dense matmul (to rank the features).
The k selected pre-activations are read off it, and the decoder and every weight
gradient then touch only k rows per token:

* `selected_pre` has a hand-written VJP: its forward is a `take_along_axis` of the dense
  pre-activations, its backward scatter-adds `g ⊗ (x − b_dec)` into the chosen columns of
  `W_enc` (autodiff of the same gather would read `W_enc` column-wise, which on CPU costs
  as much as the dense matmul), and `b_dec` gets its gradient from one mat-vec.
* `decode` gathers the k decoder rows per token; autodiff turns that into a scatter-add.

On a mesh whose "model" axis is 1 everything is local to a device except the usual
all-reduce of the gradients; with a sharded dictionary the dense path is used instead.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from sae_jax.saes import common

_DISABLED = False


def usable(mesh: Mesh | None) -> bool:
    """Whether the sparse path applies: the dictionary is not split over devices."""
    return not _DISABLED and (mesh is None or mesh.shape["model"] == 1)


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
    """Indices of each row's k largest scores, computed where the rows live (XLA would
    otherwise gather the whole batch onto every device for `top_k`)."""
    scores = lax.stop_gradient(scores)
    if mesh is None:
        return _top_k(scores, k)
    spec = P("data", None)
    return jax.shard_map(lambda s: _top_k(s, k), mesh=mesh, in_specs=spec,
                         out_specs=spec)(scores)


def _top_k(scores, k: int):
    """Indices of the k largest per row. On TPU, `approx_max_k` (recall ≥ 0.95, a partial
    reduction the TPU runs far faster than a sort); elsewhere exact `top_k`."""
    if jax.default_backend() == "tpu":
        return lax.approx_max_k(scores, k, recall_target=0.95)[1]
    return lax.top_k(scores, k)[1]


@jax.custom_vjp
def selected_pre(pre, x, b_dec, W_enc, b_enc, idx) -> Float[Array, "batch k"]:
    """`pre[b, idx[b, j]]`, where `pre = (x − b_dec) @ W_enc + b_enc`, differentiable in the
    weights with sparse gradients. `pre` itself receives no gradient. (`b_dec` is the
    encoder's centre, `common.encoder_center`: zeros for a transcoder.)"""
    return jnp.take_along_axis(pre, idx, axis=1)


def _selected_pre_fwd(pre, x, b_dec, W_enc, b_enc, idx):
    return selected_pre(pre, x, b_dec, W_enc, b_enc, idx), (x, b_dec, W_enc, idx)


def _selected_pre_bwd(residuals, g):
    x, b_dec, W_enc, idx = residuals
    d_in, width = W_enc.shape
    g = g.astype(jnp.float32)
    flat = idx.reshape(-1)
    outer = (g[:, :, None] * (x - b_dec)[:, None, :]).reshape(-1, d_in)
    dW_enc = jnp.zeros((width, d_in), jnp.float32).at[flat].add(outer).T
    db_enc = jnp.zeros((width,), jnp.float32).at[flat].add(g.reshape(-1))
    return None, None, -(W_enc @ db_enc), dW_enc, db_enc, None


selected_pre.defvjp(_selected_pre_fwd, _selected_pre_bwd)


def decode(W_dec, values: Float[Array, "batch k"], idx: Int[Array, "batch k"],
           compute_dtype: str) -> Float[Array, "batch d_in"]:
    """Σ_j values[b, j] · W_dec[idx[b, j]] (no bias), in `compute_dtype`, float32 out."""
    dtype = common.compute_dtype(compute_dtype)
    return jnp.einsum("bk,bkd->bd", values.astype(dtype), W_dec[idx].astype(dtype),
                      preferred_element_type=jnp.float32)


def fired(values: Float[Array, "batch k"], idx: Int[Array, "batch k"], width: int):
    """(F,) bool: which features were active in some row."""
    return jnp.zeros((width,), bool).at[idx.reshape(-1)].max(values.reshape(-1) > 0)
