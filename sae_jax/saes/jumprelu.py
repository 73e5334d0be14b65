"""JumpReLU SAE with an L0 penalty trained through straight-through estimators
(Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

f_i = h_i · H(h_i − θ_i) with a learned per-feature threshold θ = exp(log_threshold).
The step function has zero gradient almost everywhere, so both `jumprelu` and `step` use a
pseudo-derivative w.r.t. θ: a rectangle kernel of width `bandwidth` around the threshold.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from sae_jax.saes.common import Architecture, Code, init_dictionary, pre_activations


def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(h, threshold, bandwidth: float):
    """h · H(h − θ); ∂/∂h = H(h − θ), ∂/∂θ = −(θ/ε)·K((h − θ)/ε)."""
    return h * (h > threshold)


def _jumprelu_fwd(h, threshold, bandwidth):
    return jumprelu(h, threshold, bandwidth), (h, threshold)


def _jumprelu_bwd(bandwidth, residuals, g):
    h, threshold = residuals
    grad_h = (h > threshold) * g
    grad_t = -(threshold / bandwidth) * _rectangle((h - threshold) / bandwidth) * g
    return _sum_to_shape(grad_h, h.shape), _sum_to_shape(grad_t, threshold.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(h, threshold, bandwidth: float):
    """H(h − θ); ∂/∂h = 0, ∂/∂θ = −(1/ε)·K((h − θ)/ε). Counting it gives the L0 penalty."""
    return (h > threshold).astype(h.dtype)


def _step_fwd(h, threshold, bandwidth):
    return step(h, threshold, bandwidth), (h, threshold)


def _step_bwd(bandwidth, residuals, g):
    h, threshold = residuals
    grad_t = -(1.0 / bandwidth) * _rectangle((h - threshold) / bandwidth) * g
    return jnp.zeros(h.shape, h.dtype), _sum_to_shape(grad_t, threshold.shape)


step.defvjp(_step_fwd, _step_bwd)


def _sum_to_shape(g, shape):
    """Sums a gradient over the axes along which a (broadcast) threshold was expanded."""
    g = g.sum(tuple(range(g.ndim - len(shape))))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(axes, keepdims=True).reshape(shape)


def threshold(params):
    return jnp.exp(params["log_threshold"])


def init(key, cfg, d_in: int, data_mean=None):
    params = init_dictionary(key, d_in, cfg.width, 1.0, data_mean)
    params["log_threshold"] = jnp.full((cfg.width,), jnp.log(cfg.threshold_init), jnp.float32)
    return params


def encode(params, x, cfg, mesh=None) -> Code:
    pre = pre_activations(params, x, cfg, mesh)
    return Code(pre, jumprelu(pre, threshold(params), cfg.bandwidth), {})


ARCH = Architecture(
    name="jumprelu",
    init=init,
    encode=encode,
    defaults={"penalty": "l0", "sparsity_coeff": 1.0},
    extra_axes={"log_threshold": ("latent",)},
    unit_norm_decoder=True,
)
