"""Sparse BatchTopK codes: the k·batch largest activations of the whole batch, kept as a flat
list of (row, latent, value) entries instead of a dense (batch, F) matrix.

BatchTopK lets a busy row use more than k latents, so its codes have no fixed width per row
(`saes.sparse` keeps k per row). They do have a fixed total: n = k·batch entries. Every
device, holding a (batch/data, F/model) block of activations, takes the n largest of its
block (all of the batch's winners that lie in it are among them), all-gathers those
candidate values over ("data", "model") to find the n-th largest of the batch (the
threshold, as `select.kth_largest` does), and keeps its own candidates at or above it. The
codes never leave the device that found them: each device reads its entries' pre-activations
(a custom VJP that scatter-adds into its own `W_enc` columns, like `sparse.selected_pre`),
decodes them into a partial x̂ of its rows, and the partial decodes are `psum`med over
"model". Latent ids in a code are global (`Code.idx`), rows are local to the data shard
(`Code.rows`).

Entries past a device's n candidates cannot be kept, so the codes equal the dense rule
except when more than n entries of one block tie exactly at the threshold. Each device
gathers n = k·batch decoder rows (n·d floats per buffer), the data axis times what `sparse`
gathers per device for TopK.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from sae_jax.saes import common, sparse

_FLAT, _ROWS, _BLOCK = P(("data", "model")), P("data", None), P("data", "model")


def _axis_index(mesh, name):
    return 0 if mesh is None else lax.axis_index(name)


def _psum(x, mesh, axes):
    return x if mesh is None else lax.psum(x, axes)


def _select_block(acts, n: int, mesh):
    """Body: this block's n largest as (values, global latent ids, local rows), and the
    batch's n-th largest activation."""
    width = acts.shape[1]
    values, pos = lax.top_k(acts.reshape(-1), min(n, acts.size))
    kth = values if mesh is None else lax.all_gather(values, ("data", "model"), tiled=True,
                                                     to="invarying")
    kth = lax.top_k(kth, n)[0][-1]
    ids = pos % width + _axis_index(mesh, "model") * width
    return values, ids, pos // width, kth


def select(acts: Float[Array, "batch F"], n: int, mesh: Mesh | None = None):
    """(values, ids, rows, kth): every device's n largest activations of its block and the
    batch's n-th largest (a float32 scalar). Flat arrays are sharded over all devices."""
    acts = lax.stop_gradient(acts)
    body = partial(_select_block, n=n, mesh=mesh)
    if mesh is None:
        return body(acts)
    return jax.shard_map(body, mesh=mesh, in_specs=_BLOCK,
                         out_specs=(_FLAT, _FLAT, _FLAT, P()))(acts)


def _local(ids, width: int, mesh):
    return ids - _axis_index(mesh, "model") * width


def _take_block(block, ids, rows, mesh):
    return block[rows, _local(ids, block.shape[1], mesh)]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def selected_pre(mesh, pre, x, b_dec, W_enc, b_enc, ids, rows):
    """`pre[rows, ids]` of each entry, where `pre = (x − b_dec) @ W_enc + b_enc`; sparse
    gradients for the weights (`sparse.selected_pre`'s, per entry), none for `pre`."""
    pre = lax.stop_gradient(pre)
    if mesh is None:
        return _take_block(pre, ids, rows, None)
    return jax.shard_map(partial(_take_block, mesh=mesh), mesh=mesh,
                         in_specs=(_BLOCK, _FLAT, _FLAT), out_specs=_FLAT)(pre, ids, rows)


def _selected_pre_fwd(mesh, pre, x, b_dec, W_enc, b_enc, ids, rows):
    return selected_pre(mesh, pre, x, b_dec, W_enc, b_enc, ids, rows), (x, b_dec, W_enc, ids,
                                                                         rows)


def _scatter_block(g, x, b_dec, W_enc, ids, rows, mesh):
    d_in, width = W_enc.shape
    local = _local(ids, width, mesh)
    outer = g[:, None] * (x[rows] - b_dec)
    dW_enc = _psum(jnp.zeros((width, d_in), jnp.float32).at[local].add(outer).T, mesh, "data")
    db_enc = _psum(jnp.zeros((width,), jnp.float32).at[local].add(g), mesh, "data")
    return dW_enc, db_enc, _psum(-(W_enc @ db_enc), mesh, "model")


def _selected_pre_bwd(mesh, residuals, g):
    x, b_dec, W_enc, ids, rows = residuals
    g = g.astype(jnp.float32)
    body = partial(_scatter_block, mesh=mesh)
    if mesh is None:
        dW_enc, db_enc, db_dec = body(g, x, b_dec, W_enc, ids, rows)
    else:
        dW_enc, db_enc, db_dec = jax.shard_map(
            body, mesh=mesh, in_specs=(_FLAT, _ROWS, P(), P(None, "model"), _FLAT, _FLAT),
            out_specs=(P(None, "model"), P("model"), P()))(g, x, b_dec, W_enc, ids, rows)
    return None, None, db_dec, dW_enc, db_enc, None, None


selected_pre.defvjp(_selected_pre_fwd, _selected_pre_bwd)


def _decode_block(W_dec, values, ids, rows, n_rows: int, dtype, prefix, mesh):
    if prefix is not None:
        values = jnp.where(ids < prefix, values, 0.0)
    rows_of = W_dec[_local(ids, W_dec.shape[0], mesh)].astype(dtype).astype(jnp.float32)
    terms = values.astype(dtype).astype(jnp.float32)[:, None] * rows_of
    x_hat = jnp.zeros((n_rows, W_dec.shape[1]), jnp.float32).at[rows].add(terms)
    return _psum(x_hat, mesh, "model")


def decode(W_dec, values, ids, rows, batch: int, compute_dtype: str, mesh: Mesh | None = None,
           prefix: int | None = None) -> Float[Array, "batch d_in"]:
    """Σ over entries of value · W_dec[id] into its row (no bias), inputs rounded to
    `compute_dtype`, float32 sums; with `prefix`, latents [0, prefix) only (Matryoshka)."""
    dtype = common.compute_dtype(compute_dtype)
    data = 1 if mesh is None else mesh.shape["data"]
    body = partial(_decode_block, n_rows=batch // data, dtype=dtype, prefix=prefix, mesh=mesh)
    if mesh is None:
        return body(W_dec, values, ids, rows)
    return jax.shard_map(body, mesh=mesh, in_specs=(P("model", None), _FLAT, _FLAT, _FLAT),
                         out_specs=_ROWS)(W_dec, values, ids, rows)


def decode_code(W_dec, code, compute_dtype: str, mesh: Mesh | None = None,
                prefix: int | None = None) -> Float[Array, "batch d_in"]:
    """x̂ without bias of a sparse `Code`, per-row (`saes.sparse`) or flat (this module);
    with `prefix`, of latents [0, prefix) only."""
    if code.rows is not None:
        return decode(W_dec, code.f, code.idx, code.rows, code.pre.shape[0], compute_dtype,
                      mesh, prefix)
    f = code.f if prefix is None else jnp.where(code.idx < prefix, code.f, 0.0)
    return sparse.decode(W_dec, f, code.idx, compute_dtype, mesh)
