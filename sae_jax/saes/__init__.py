"""The SAE core as pure functions over a params dict, dispatched by `cfg.arch`.

`init`, `encode`, `decode` and `loss` are all a caller needs; each architecture module
supplies an `Architecture` record and is listed in `ARCHITECTURES`.

Any architecture can be a transcoder (`cfg.transcoder`): it encodes one activation and
reconstructs another (`target`), its encoder does not subtract `b_dec` (which lives in the
target space), and with `cfg.skip_connection` a linear path `W_skip` is added to x̂.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.saes import (
    batch_sparse,
    batchtopk,
    clt,
    crosscoder,
    jumprelu,
    matryoshka,
    relu,
    sparse,
    topk,
)
from sae_jax.saes.common import (
    Architecture,
    Code,
    LossContext,
    Params,
    decode,
    skip,
    squared_error,
    transcoder_params,
)
from sae_jax.saes.penalties import PENALTIES

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (relu.ARCH, jumprelu.ARCH, topk.ARCH, batchtopk.ARCH, matryoshka.ARCH,
                        *crosscoder.ARCHS, *clt.ARCHS)
}


def get(cfg) -> Architecture:
    return ARCHITECTURES[cfg.arch]


def init(key, cfg, d_in: int, data_mean=None, d_out: int | None = None) -> Params:
    """Fresh float32 params for `cfg.arch` on inputs of width `d_in` (already scaled).

    `data_mean` is the mean of what is reconstructed: the input for an SAE, the target (of
    width `d_out`) for a transcoder."""
    arch = get(cfg)
    if not cfg.transcoder:
        return arch.init(key, cfg, d_in, data_mean)
    key, out_key = jax.random.split(key)
    params = arch.init(key, cfg, d_in, None)
    d_out = d_out or d_in
    mask = arch.decoder_mask(cfg, d_out) if arch.decoder_mask else None
    return transcoder_params(out_key, params, d_out, data_mean, cfg.skip_connection, mask)


def encode(params: Params, x, cfg, mesh=None) -> Code:
    """Inference encoding of scaled inputs `x` (batch, d_in) -> `Code(pre, f, stats)`."""
    return get(cfg).encode(params, x, cfg, mesh)


def reconstruct(params: Params, x, cfg, mesh=None):
    """Inference: x̂ (or a transcoder's predicted target) from scaled inputs `x`."""
    f = encode(params, x, cfg, mesh).f
    return decode(params, f, cfg.compute_dtype, mesh) + skip(params, x, cfg)


def param_axes(cfg) -> dict[str, tuple[str, ...]]:
    """Logical axes of every param (the sharding plan before the mesh is known)."""
    axes = get(cfg).param_axes()
    if cfg.skip_connection:
        axes["W_skip"] = ("embed", "embed")
    return axes


def loss(params: Params, x, cfg, ctx: LossContext | None = None, mesh=None, target=None):
    """Training loss on scaled inputs `x`: reconstruction + penalty + auxiliary terms.

    Args:
      target: what to reconstruct (a transcoder's scaled output activations); default `x`.

    Returns:
      `(loss, aux)`: aux holds the loss terms, the batch's L0 and FVU, the per-feature
      `fired` mask (F,), and the architecture's statistics.
    """
    arch = get(cfg)
    if arch.decoder_mask:  # masked entries get exactly zero gradient (`Architecture`)
        mask = arch.decoder_mask(cfg, params["W_dec"].shape[1])
        params = {**params, "W_dec": params["W_dec"] * mask}
    if ctx is None:
        ctx = LossContext(jnp.float32(cfg.sparsity_coeff), jnp.zeros((cfg.width,), bool))
    code = (arch.train_encode or arch.encode)(params, x, cfg, mesh)
    x = x.astype(jnp.float32)
    target = x if target is None else target.astype(jnp.float32)
    linear = skip(params, x, cfg)  # 0.0 unless a skip transcoder
    base = params["b_dec"] + linear
    if code.idx is None:
        x_hat = decode(params, code.f, cfg.compute_dtype, mesh) + linear
    else:
        x_hat = batch_sparse.decode_code(params["W_dec"], code, cfg.compute_dtype, mesh) + base
    err = squared_error(target, x_hat)
    mse = err.mean()
    extra, extra_metrics = (arch.reconstruction_terms(params, code, target, base, cfg, mesh)
                            if arch.reconstruction_terms else (0.0, {}))
    penalty = PENALTIES[cfg.penalty](params, code, cfg).mean()
    aux = (arch.aux_loss(params, x, target, x_hat, code, ctx, cfg, mesh)
           if arch.aux_loss else 0.0)
    total = mse + extra + ctx.sparsity_coeff * penalty + cfg.aux_coeff * aux
    active = code.f > 0
    rows = active.sum(-1) if code.rows is None else active.sum() / x.shape[0]  # L0 per row
    variance = jnp.sum(jnp.square(target - target.mean(0)))
    metrics = {
        "loss": total,
        "mse": mse,
        "penalty": penalty,
        "aux_loss": jnp.asarray(aux, jnp.float32),
        "l0": rows.astype(jnp.float32).mean(),
        "fvu": err.sum() / jnp.maximum(variance, 1e-12),
        "fired": active.any(0) if code.idx is None else sparse.fired(code.f, code.idx,
                                                                      cfg.width),
        **code.stats,
        **extra_metrics,
    }
    return total, metrics


__all__ = ["ARCHITECTURES", "Code", "LossContext", "Params", "decode", "encode", "init",
           "loss", "param_axes", "reconstruct", "skip"]
