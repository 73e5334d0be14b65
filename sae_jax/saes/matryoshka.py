"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"; SAELens's `matryoshka_batchtopk`).

A BatchTopK SAE whose nested prefixes of the dictionary, latents `[0, m)` for each level m
in `matryoshka_widths`, must each reconstruct the input on their own: the loss adds
‖x − x̂_m‖² for every inner level to the full reconstruction loss. General features settle
in the first latents (every level uses them) and specific ones further out, which cuts
feature absorption. The selection, AuxK and the inference threshold are BatchTopK's.

On a mesh the prefixes cut the dictionary axis, which is split over "model" devices, so a
level's latents may span several shards. Each level is therefore a mask on the latent index
(`latent < m`) applied where the latents live, followed by the usual sharded decoder matmul;
nothing is sliced or gathered across shards. Cost: one extra decoder matmul per inner level
(SAELens also decodes once per level). A flat sparse code (`saes.batch_sparse`) decodes
each level from its entries with ids below m instead: no dense matmul.
"""

from __future__ import annotations

import jax.numpy as jnp

from sae_jax.errors import UserError
from sae_jax.saes import batch_sparse, batchtopk
from sae_jax.saes.common import Architecture, Code, constrain, matmul, squared_error


def levels(cfg) -> tuple[int, ...]:
    """The prefix widths, ending with the full width (default: width/16, width/4, width)."""
    widths = cfg.matryoshka_widths
    if widths is None:
        widths = tuple(w for w in (cfg.width // 16, cfg.width // 4) if w > 0)
    widths = tuple(int(w) for w in widths)
    return widths if widths and widths[-1] == cfg.width else (*widths, cfg.width)


def check(cfg) -> None:
    widths = levels(cfg)
    if any(w <= 0 for w in widths) or any(a >= b for a, b in zip(widths, widths[1:])):
        raise UserError(f"matryoshka_widths must be positive, strictly increasing and at most "
                        f"width={cfg.width}, got {cfg.matryoshka_widths}")


def prefix_losses(params, code: Code, target, base, cfg, mesh=None):
    """Σ over inner levels m of mean ‖target − x̂_m‖², x̂_m decoding latents [0, m) only."""
    latent = constrain(jnp.arange(cfg.width), mesh, ("latent",))
    total, metrics = jnp.float32(0.0), {}
    for m in levels(cfg)[:-1]:
        if code.idx is None:
            x_hat = constrain(matmul(jnp.where(latent < m, code.f, 0.0), params["W_dec"],
                                     cfg.compute_dtype), mesh, ("batch", "embed")) + base
        else:
            x_hat = batch_sparse.decode_code(params["W_dec"], code, cfg.compute_dtype, mesh,
                                             prefix=m) + base
        mse = squared_error(target, x_hat).mean()
        metrics[f"mse_prefix_{m}"] = mse
        total = total + mse
    return total, metrics


ARCH = Architecture(
    name="matryoshka",
    init=batchtopk.init,
    encode=batchtopk.encode,
    train_encode=batchtopk.train_encode,
    aux_loss=batchtopk.ARCH.aux_loss,
    reconstruction_terms=prefix_losses,
    post_update=batchtopk.update_threshold,
    defaults=batchtopk.ARCH.defaults,
    extra_axes=batchtopk.ARCH.extra_axes,
    unit_norm_decoder=True,
    check=check,
)
