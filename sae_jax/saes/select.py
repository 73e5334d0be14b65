"""Top-k selection over a dictionary that may be sharded across devices.

An all-gather of the (batch, F) pre-activations would move the biggest tensor of the step
between chips. Instead each "model" shard takes its local top-k, the k-per-shard candidate
values are gathered (batch × k·shards numbers), and the global top-k is taken from those:
exact, because every global winner is a local winner on its own shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float

_BATCH_LATENT = P("data", "model")


def _mask_from_indices(shape, idx, keep=True) -> Array:
    rows = jnp.arange(shape[0])[:, None]
    return jnp.zeros(shape, bool).at[rows, idx].max(keep)


def _local_topk_mask(scores, k: int):
    _, idx = lax.top_k(scores, k)
    return _mask_from_indices(scores.shape, idx)


def _sharded_topk_mask(scores, k: int):
    """Body of the shard_map: `scores` is this device's (batch/data, F/model) block."""
    k_local = min(k, scores.shape[1])
    values, idx = lax.top_k(scores, k_local)
    candidates = lax.all_gather(values, "model", axis=1, tiled=True)
    _, pos = lax.top_k(candidates, k)
    mine = pos // k_local == lax.axis_index("model")
    local_idx = jnp.take_along_axis(idx, pos % k_local, axis=1)
    return _mask_from_indices(scores.shape, local_idx, mine)


def topk_mask(scores: Float[Array, "batch F"], k: int,
              mesh: Mesh | None = None) -> Bool[Array, "batch F"]:
    """Marks the k largest entries of each row (ties: lowest index first).

    Args:
      scores: values to rank; no gradient flows through the mask.
      k: entries kept per row.
      mesh: when given, `scores` is treated as sharded P("data", "model") and the selection
        never gathers the full matrix.
    """
    scores = lax.stop_gradient(scores)
    if mesh is None:
        return _local_topk_mask(scores, k)
    return jax.shard_map(lambda s: _sharded_topk_mask(s, k), mesh=mesh,
                         in_specs=_BATCH_LATENT, out_specs=_BATCH_LATENT)(scores)


def _sharded_kth_largest(values, n: int):
    flat = values.reshape(-1)
    local, _ = lax.top_k(flat, min(n, flat.size))
    candidates = lax.all_gather(local, ("data", "model"), tiled=True, to="invarying")
    return lax.top_k(candidates, n)[0][-1]


def kth_largest(values: Float[Array, "batch F"], n: int, mesh: Mesh | None = None):
    """The n-th largest entry of the whole (global) matrix, as a float32 scalar.

    BatchTopK keeps the k·batch largest activations of the batch; this finds the value at
    that rank. Sharded, each device contributes its own top-n candidates only.
    """
    values = lax.stop_gradient(values)
    if mesh is None:
        return lax.top_k(values.reshape(-1), n)[0][-1]
    return jax.shard_map(lambda v: _sharded_kth_largest(v, n), mesh=mesh,
                         in_specs=_BATCH_LATENT, out_specs=P())(values)
