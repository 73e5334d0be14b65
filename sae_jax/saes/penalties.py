"""Sparsity penalties, keyed by name (`penalty=` in the config).

A penalty maps `(params, code, cfg)` to one non-negative number per row; the loss
multiplies its batch mean by `sparsity_coeff` (warmed up over `sparsity_warmup`). Each
activation is weighted by its latent's `penalty_norms` (the decoder norm; for a crosscoder,
by default the sum of its per-source decoder norms).
Adding a penalty = one function here + one line in `PENALTIES` + one test.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from sae_jax.saes import jumprelu
from sae_jax.saes.common import Code, Params, penalty_norms

TANH_SCALE = 4.0  # saturation point of the tanh penalty, in units of f_i·‖W_dec,i‖
LP_P = 0.5  # exponent of the lp penalty


def l1(params: Params, code: Code, cfg) -> Float[Array, " batch"]:
    """Σ_i f_i·‖W_dec,i‖: L1 that cannot be dodged by growing decoder rows (Anthropic 2024)."""
    return (code.f * code.per_feature(penalty_norms(params, cfg))).sum(-1)


def tanh(params: Params, code: Code, cfg) -> Float[Array, " batch"]:
    """Σ_i tanh(s·f_i·‖W_dec,i‖): like L1 for small activations, flat for large ones, so big
    activations are not shrunk (Anthropic, "Circuits Updates", Feb. 2025)."""
    return jnp.tanh(TANH_SCALE * code.f * code.per_feature(penalty_norms(params, cfg))).sum(-1)


def lp(params: Params, code: Code, cfg) -> Float[Array, " batch"]:
    """Σ_i (f_i·‖W_dec,i‖)^p with p = ½: concave, so it pushes small activations to 0 harder
    than L1 and shrinks large ones less (an Lp, p < 1, relaxation of L0). The 1e-8 keeps the
    gradient finite at f = 0."""
    return jnp.power(code.f * code.per_feature(penalty_norms(params, cfg)) + 1e-8, LP_P).sum(-1)


def l0(params: Params, code: Code, cfg) -> Float[Array, " batch"]:
    """Σ_i H(h_i − θ_i), the number of active features, with a straight-through gradient
    to the JumpReLU thresholds (Gemma Scope)."""
    return jumprelu.step(code.pre, jumprelu.threshold(params), cfg.bandwidth).sum(-1)


def none(params: Params, code: Code, cfg) -> Float[Array, " batch"]:
    """No penalty: for architectures whose sparsity is structural (TopK, BatchTopK)."""
    return jnp.zeros(code.pre.shape[:-1], jnp.float32)


PENALTIES = {"l1": l1, "tanh": tanh, "lp": lp, "l0": l0, "none": none}
