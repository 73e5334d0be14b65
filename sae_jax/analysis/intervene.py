"""Interventions on the residual stream: pure, jit-traceable functions of an SAE and h.

* `feature_activation(sae, h, i)` = f_i(h), the SAE's activation of feature i (the whole
  encoder runs, so TopK/BatchTopK competition is respected);
* `add_feature(sae, h, i, amount, mask)` = h + amount · W_dec[i] / input_scale at the
  positions in `mask` (W_dec lives in scaled units; dividing by the input scale puts the
  direction in raw units).

Because decoding is linear, clamping feature i to v *with the SAE error term kept*,
h' = decode(f with f_i := v) + (h − decode(f)), is exactly h + (v − f_i(h)) · W_dec[i] /
input_scale: only feature i changes, the SAE's reconstruction error stays in the stream
(`clamp_feature`). With v = f_i(h) the stream, and so the model's output, is unchanged.

The `sae` argument is an `SAE` (a pytree: pass it into your `jax.jit` as an argument, and its
params are traced rather than baked in). `steer` and the audit's causal scores are built on
these functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def feature_activation(sae, h, feature) -> jax.Array:
    """f_feature of raw residual stream h (..., d): the SAE's activation of one feature,
    shape h.shape[:-1]."""
    f = sae.encode_raw(h.reshape(-1, h.shape[-1]))
    return f[:, feature].reshape(h.shape[:-1])


def add_direction(h, direction, amount, mask) -> jax.Array:
    """h + amount * direction where `mask` (h.shape[:-1]) is true.

    `direction` broadcasts against h (e.g. (d,) or (n, 1, d) for one per sequence); `amount`
    is a scalar or an array of shape h.shape[:-1].
    """
    amount = jnp.broadcast_to(jnp.asarray(amount, jnp.float32), h.shape[:-1])
    delta = amount[..., None] * jnp.asarray(direction, jnp.float32)
    return jnp.where(mask[..., None], h + delta.astype(h.dtype), h)


def feature_direction(sae, feature) -> jax.Array:
    """W_dec[feature] in raw units (d,) (or (k, d) for k feature ids): what one unit of the
    feature adds to the stream."""
    return jnp.asarray(sae.params["W_dec"])[feature].astype(jnp.float32) / sae.input_multiplier


def add_feature(sae, h, feature, amount, mask) -> jax.Array:
    """h + amount * W_dec[feature] / input_scale at positions where mask (h.shape[:-1], bool)
    is true.

    amount is a scalar or an array of shape h.shape[:-1]. Because decode is linear, clamping
    feature i to v with the error term kept is exactly add_feature(..., amount = v - f_i(h)).
    """
    return add_direction(h, feature_direction(sae, feature), amount, mask)


def clamp_feature(sae, h, feature, value, mask) -> jax.Array:
    """h with feature `feature` clamped to `value` at `mask`, the SAE error term kept.

    `value` is a scalar or an array of shape h.shape[:-1]; positions outside `mask` are
    returned unchanged.
    """
    current = feature_activation(sae, h, feature)
    return add_feature(sae, h, feature, value - current, mask)


def steering_hook(sae, feature: int, value: float, mask: np.ndarray, directions=None):
    """A `replace` hook `fn(h) -> h'` that clamps `feature` to `value` at `mask` (n, L).

    With `directions` (m, d), the model is run on m stacked copies of the n texts (m·n rows):
    copy j gets `directions[j]` added with the amounts v − f_i(h) that the clamp needs, so a
    random direction is pushed exactly as hard as the feature (copy 0 should be the feature).
    """
    if directions is None:
        directions = feature_direction(sae, feature)[None]
    directions = jnp.asarray(directions, jnp.float32)
    m = directions.shape[0]
    mask = jnp.tile(jnp.asarray(mask, bool), (m, 1))
    n = mask.shape[0] // m

    def hook(h):
        amount = value - feature_activation(sae, h, feature)
        per_row = jnp.repeat(directions, n, axis=0)[:, None, :]
        return add_direction(h, per_row, amount, mask)

    return hook


@jax.jit
def activation_before_after(sae, h, mask, value, feature):
    """Sums of f_feature over `mask` before and after the clamp to `value`, per sequence
    (h: (n, L, d) at the layer)."""
    before = feature_activation(sae, h, feature)
    steered = clamp_feature(sae, h, feature, value, mask)
    after = feature_activation(sae, steered, feature)
    return jnp.where(mask, before, 0.0).sum(-1), jnp.where(mask, after, 0.0).sum(-1)


def random_directions(like, n: int, seed: int) -> np.ndarray:
    """`n` seeded random directions (n, d) with the norm of `like` (d,): the control push."""
    if n == 0:
        return np.zeros((0, like.shape[-1]), np.float32)
    u = np.random.default_rng(seed).standard_normal((n, like.shape[-1]))
    u *= float(jnp.linalg.norm(like)) / np.linalg.norm(u, axis=1, keepdims=True)
    return u.astype(np.float32)
