"""BatchTopK SAE (Bussmann et al. 2024): keep the k·batch largest activations of the whole
batch, so busy rows may use more than k features and easy rows fewer.

That rule needs a batch, so for inference the SAE becomes a JumpReLU with one global
threshold: the `threshold` buffer is an exponential moving average of the smallest
*positive* activation kept in each training batch (SAELens's estimator). A batch with fewer
than k·batch positive pre-activations keeps them all, and its k·batch-th largest is 0; that
0 would drag the threshold down and let every positive pre-activation fire at inference, so
such a batch contributes its smallest positive kept activation, and one with none leaves
the estimate alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.saes import batch_sparse, sparse
from sae_jax.saes.common import (
    Architecture,
    Code,
    encoder_center,
    init_dictionary,
    pre_activations,
)
from sae_jax.saes.select import kth_largest
from sae_jax.saes.topk import auxk_loss

THRESHOLD_EMA = 0.01  # weight of each new batch in the threshold estimate


def init(key, cfg, d_in: int, data_mean=None):
    params = init_dictionary(key, d_in, cfg.width, 1.0, data_mean)
    params["threshold"] = jnp.full((), -1.0, jnp.float32)  # < 0: not estimated yet
    return params


def train_encode(params, x, cfg, mesh=None) -> Code:
    """Flat sparse codes (`saes.batch_sparse`) unless `sparse.disabled()` or a penalty
    (which weighs per row) asks for the dense reference."""
    if sparse.usable(mesh) and cfg.penalty == "none":
        return _sparse_train_encode(params, x, cfg, mesh)
    pre = pre_activations(params, x, cfg, mesh)
    acts = jax.nn.relu(pre)
    kth = kth_largest(acts, cfg.k * x.shape[0], mesh)
    f = jnp.where((acts >= kth) & (acts > 0), acts, 0.0)
    return Code(pre, f, _threshold_stats(f))


def _sparse_train_encode(params, x, cfg, mesh) -> Code:
    pre = jax.lax.stop_gradient(pre_activations(params, x, cfg, mesh))
    acts, ids, rows, kth = batch_sparse.select(jax.nn.relu(pre), cfg.k * x.shape[0], mesh)
    values = batch_sparse.selected_pre(mesh, pre, x, encoder_center(params, cfg),
                                       params["W_enc"], params["b_enc"], ids, rows)
    f = jnp.where((acts >= kth) & (acts > 0), jax.nn.relu(values), 0.0)
    return Code(pre, f, _threshold_stats(f), ids, rows)


def _threshold_stats(f) -> dict:
    smallest_kept = jnp.min(jnp.where(f > 0, f, jnp.inf))
    # 0 when nothing was kept: no estimate (a kept activation is always > 0)
    return {"batch_threshold": jnp.where(jnp.isfinite(smallest_kept), smallest_kept, 0.0)}


def encode(params, x, cfg, mesh=None) -> Code:
    pre = pre_activations(params, x, cfg, mesh)
    return Code(pre, jnp.where(pre > params["threshold"], jax.nn.relu(pre), 0.0), {})


def update_threshold(params, stats, cfg):
    old, new = params["threshold"], stats["batch_threshold"]
    estimate = jnp.where(old < 0, new, old + THRESHOLD_EMA * (new - old))
    estimate = jnp.where(new > 0, estimate, old)  # a batch that kept nothing
    return {**params, "threshold": estimate}


ARCH = Architecture(
    name="batchtopk",
    init=init,
    encode=encode,
    train_encode=train_encode,
    aux_loss=auxk_loss,
    post_update=update_threshold,
    defaults={"penalty": "none", "sparsity_coeff": 0.0},
    extra_axes={"threshold": ()},
    unit_norm_decoder=True,
)
