"""The `SAE` as a pytree: passed into `jax.jit` as an argument its params are traced (one
compiled program serves SAEs of one config and scale), and `encode_raw` /
`reconstruct_raw` are the one place raw activations are scaled."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import saes
from sae_jax.config import make_config
from sae_jax.sae import SAE


def _sae(seed: int, scale: float = 1.5, transcoder: bool = False) -> SAE:
    cfg = make_config(arch="relu", width=12, compute_dtype="float32", transcoder=transcoder)
    params = saes.init(jax.random.key(seed), cfg, 6, d_out=6)
    return SAE(cfg, params, scale, 3, 0.5 if transcoder else None)


def test_sae_is_a_pytree_traced_in_jit():
    a, b = _sae(0), _sae(1)
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    leaves = jax.tree_util.tree_leaves(a)
    assert len(leaves) == len(a.params) + 1  # the params and the step; config and scale static

    @jax.jit
    def encode(sae, x):
        return sae.encode_raw(x)

    for sae in (a, b):
        want = saes.encode(sae.params, jnp.asarray(x) * sae.input_scale, sae.config).f
        np.testing.assert_allclose(encode(sae, x), want, rtol=1e-6)
    assert encode._cache_size() == 1  # b reused a's program: its params were arguments
    encode(_sae(0, scale=2.0), x)
    assert encode._cache_size() == 2  # another scale is another program


def test_encode_columns_and_reconstruct_raw():
    sae = _sae(2)
    x = np.random.default_rng(1).standard_normal((2, 3, 6)).astype(np.float32)
    f = np.asarray(sae.encode(x))
    assert f.shape == (2, 3, 12)
    np.testing.assert_array_equal(np.asarray(sae.encode(x, [5, 0])), f[..., [5, 0]])
    np.testing.assert_allclose(sae.reconstruct_raw(x.reshape(-1, 6)),
                               np.asarray(sae(x)).reshape(-1, 6), rtol=1e-6)
    tc = _sae(3, transcoder=True)
    scaled = jnp.asarray(x.reshape(-1, 6)) * tc.input_scale
    want = saes.reconstruct(tc.params, scaled, tc.config) / 0.5  # by the target scale
    np.testing.assert_allclose(tc.reconstruct_raw(x.reshape(-1, 6)), want, rtol=1e-6)
    assert dataclasses.replace(sae, step=4) is not sae and sae != _sae(2)  # by identity
