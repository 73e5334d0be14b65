"""`sae_jax.load`: encode/decode on raw activations, any leading shape, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax
from sae_jax import saes
from sae_jax.config import make_config
from sae_jax.errors import UserError
from sae_jax.training.train import train


@pytest.fixture(scope="module")
def trained(synthetic_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("load") / "run"
    cfg = make_config(arch="topk", width=64, k=4, steps=30, batch_size=128)
    train(cfg, synthetic_store, run, progress=False, devices=jax.devices()[:1])
    return sae_jax.load(run)


def test_encode_decode_take_raw_activations(trained, synthetic):
    x = synthetic[0][:10]
    f = trained.encode(x)
    expected = saes.encode(trained.params, jnp.asarray(x) * trained.input_scale,
                           trained.config).f
    np.testing.assert_allclose(f, expected, rtol=1e-6, atol=1e-6)
    x_hat = trained.decode(f)
    np.testing.assert_allclose(
        x_hat, saes.decode(trained.params, expected) / trained.input_scale, rtol=1e-5,
        atol=1e-6)
    assert np.mean((np.asarray(x_hat) - x) ** 2) < np.var(x)  # it reconstructs something
    np.testing.assert_allclose(trained(x), x_hat)


def test_leading_dimensions_are_kept(trained, synthetic):
    x = synthetic[0][:12].reshape(3, 4, 32)
    assert trained.encode(x).shape == (3, 4, 64)
    assert trained.encode(x[0, 0]).shape == (64,)
    assert trained.decode(trained.encode(x)).shape == (3, 4, 32)


def test_wrong_width_is_a_clear_error(trained):
    with pytest.raises(UserError, match=r"encode input must have last dimension 32, got shape"):
        trained.encode(np.zeros((2, 31)))


def test_config_and_params_names(trained):
    assert trained.config.arch == "topk" and trained.step == 30
    assert {k: v.shape for k, v in trained.params.items()} == {
        "W_enc": (32, 64), "b_enc": (64,), "W_dec": (64, 32), "b_dec": (32,)}


def test_missing_run(tmp_path):
    with pytest.raises(UserError, match="no run at"):
        sae_jax.load(tmp_path)
