"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders"; sparsify).

Each row keeps exactly its k largest pre-activations (after ReLU), so sparsity is set
directly instead of through a penalty. Dead latents are revived by AuxK: the top `aux_k`
dead latents must reconstruct the residual error the live ones leave.

Training uses sparse codes (`saes.sparse`: only the encoder forward is a dense matmul),
also on a dictionary sharded over a "model" axis; `encode` (inference) is dense.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.saes import sparse
from sae_jax.saes.common import (
    Architecture,
    Code,
    encoder_center,
    init_dictionary,
    matmul,
    pre_activations,
    squared_error,
)
from sae_jax.saes.select import topk_mask


def init(key, cfg, d_in: int, data_mean=None):
    return init_dictionary(key, d_in, cfg.width, 1.0, data_mean)


def encode(params, x, cfg, mesh=None) -> Code:
    pre = pre_activations(params, x, cfg, mesh)
    return Code(pre, jnp.where(topk_mask(pre, cfg.k, mesh), jax.nn.relu(pre), 0.0), {})


def train_encode(params, x, cfg, mesh=None) -> Code:
    if not sparse.usable(mesh):
        return encode(params, x, cfg, mesh)
    pre = jax.lax.stop_gradient(pre_activations(params, x, cfg, mesh))
    idx = sparse.topk_indices(pre, cfg.k, mesh)
    values = sparse.selected_pre(pre, x, encoder_center(params, cfg), params["W_enc"],
                                 params["b_enc"], idx, mesh)
    return Code(pre, jax.nn.relu(values), {}, idx)


def auxk_loss(params, x, target, x_hat, code: Code, ctx, cfg, mesh=None):
    """Mean over rows of ‖e − ê‖², where e = target − x̂ and ê decodes the top-`aux_k` dead
    latents (Gao et al. 2024, eq. 2).

    The same units as the main loss (the mean per-row ‖target − x̂‖²), so `aux_coeff` = 1/32
    weighs AuxK against reconstruction exactly as the paper's α does; sparsify divides both
    terms by one shared variance, which keeps the same ratio. (It used to be divided by the
    residual's own variance while the main term was not, which weighed AuxK ~1/V of the
    paper's α, V the per-row variance in scaled units.) Skipped (0) by a `cond` when nothing
    is dead, which is most steps: its top-k is not free. A sparse code's AuxK is sparse too,
    unless the dictionary is split and its gathers would outgrow the dense path
    (`sparse.gather_pays`).
    """
    aux_k = min(cfg.aux_k or x.shape[-1] // 2, code.pre.shape[-1])

    def dense_residual_hat():
        # a sparse code's `pre` carries no gradient: recompute it (on AuxK steps only)
        pre = code.pre if code.idx is None else pre_activations(params, x, cfg, mesh)
        keep = topk_mask(jnp.where(ctx.dead, pre, -jnp.inf), aux_k, mesh) & ctx.dead
        return matmul(jnp.where(keep, jax.nn.relu(pre), 0.0), params["W_dec"],
                      cfg.compute_dtype)

    def sparse_residual_hat():
        scores = jnp.where(ctx.dead, code.pre, -jnp.inf)
        idx = sparse.topk_indices(scores, aux_k, mesh)
        values = sparse.selected_pre(code.pre, x, encoder_center(params, cfg), params["W_enc"],
                                     params["b_enc"], idx, mesh)
        dead = sparse.take(scores, idx, mesh) > -jnp.inf  # not ctx.dead[idx]: no F gather
        values = jnp.where(dead, jax.nn.relu(values), 0.0)
        return sparse.decode(params["W_dec"], values, idx, cfg.compute_dtype, mesh)

    def compute():
        residual = jax.lax.stop_gradient(target - x_hat)
        gather = code.idx is not None and sparse.gather_pays(aux_k, x.shape[-1],
                                                             cfg.width, mesh)
        residual_hat = sparse_residual_hat() if gather else dense_residual_hat()
        return squared_error(residual, residual_hat).mean()

    return jax.lax.cond(ctx.dead.any(), compute, lambda: jnp.float32(0.0))


ARCH = Architecture(
    name="topk",
    init=init,
    encode=encode,
    train_encode=train_encode,
    aux_loss=auxk_loss,
    defaults={"penalty": "none", "sparsity_coeff": 0.0},
    unit_norm_decoder=True,
)
