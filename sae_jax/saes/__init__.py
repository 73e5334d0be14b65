"""The SAE core as pure functions over a params dict, dispatched by `cfg.arch`.

`init`, `encode`, `decode` and `loss` are all a caller needs; each architecture module
supplies an `Architecture` record and is listed in `ARCHITECTURES`.
"""

from __future__ import annotations

import jax.numpy as jnp

from sae_jax.saes import batchtopk, jumprelu, relu, sparse, topk
from sae_jax.saes.common import Architecture, Code, LossContext, Params, decode, squared_error

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (relu.ARCH, jumprelu.ARCH, topk.ARCH, batchtopk.ARCH)
}


def get(cfg) -> Architecture:
    return ARCHITECTURES[cfg.arch]


def init(key, cfg, d_in: int, data_mean=None) -> Params:
    """Fresh float32 params for `cfg.arch` on inputs of width `d_in` (already scaled)."""
    return get(cfg).init(key, cfg, d_in, data_mean)


def encode(params: Params, x, cfg, mesh=None) -> Code:
    """Inference encoding of scaled inputs `x` (batch, d_in) -> `Code(pre, f, stats)`."""
    return get(cfg).encode(params, x, cfg, mesh)


def param_axes(cfg) -> dict[str, tuple[str, ...]]:
    """Logical axes of every param (the sharding plan before the mesh is known)."""
    return get(cfg).param_axes()


def loss(params: Params, x, cfg, ctx: LossContext | None = None, mesh=None):
    """Training loss on scaled inputs `x`: reconstruction + penalty + auxiliary terms.

    Returns:
      `(loss, aux)`: aux holds the loss terms, the batch's L0 and FVU, the per-feature
      `fired` mask (F,), and the architecture's statistics.
    """
    from sae_jax.penalties import PENALTIES  # penalties import the jumprelu STE from here

    arch = get(cfg)
    if ctx is None:
        ctx = LossContext(jnp.float32(cfg.sparsity_coeff), jnp.zeros((cfg.width,), bool))
    code = (arch.train_encode or arch.encode)(params, x, cfg, mesh)
    x = x.astype(jnp.float32)
    if code.idx is None:
        x_hat = decode(params, code.f, cfg.compute_dtype, mesh)
    else:
        x_hat = sparse.decode(params["W_dec"], code.f, code.idx, cfg.compute_dtype)
        x_hat = x_hat + params["b_dec"]
    err = squared_error(x, x_hat)
    mse = err.mean()
    penalty = PENALTIES[cfg.penalty](params, code, cfg).mean()
    aux = arch.aux_loss(params, x, x_hat, code, ctx, cfg, mesh) if arch.aux_loss else 0.0
    total = mse + ctx.sparsity_coeff * penalty + cfg.aux_coeff * aux
    active = code.f > 0
    variance = jnp.sum(jnp.square(x - x.mean(0)))
    metrics = {
        "loss": total,
        "mse": mse,
        "penalty": penalty,
        "aux_loss": jnp.asarray(aux, jnp.float32),
        "l0": active.sum(-1).astype(jnp.float32).mean(),
        "fvu": err.sum() / jnp.maximum(variance, 1e-12),
        "fired": active.any(0) if code.idx is None else sparse.fired(code.f, code.idx,
                                                                      cfg.width),
        **code.stats,
    }
    return total, metrics


__all__ = ["ARCHITECTURES", "Code", "LossContext", "Params", "decode", "encode", "init",
           "loss", "param_axes"]
