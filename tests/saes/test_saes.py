"""The SAE core: shapes and dtypes of every architecture, their invariants, and penalties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import saes
from sae_jax.config import make_config
from sae_jax.saes import penalties
from sae_jax.saes.common import Code, LossContext
from sae_jax.saes.select import kth_largest, topk_mask

D, F, B = 16, 64, 32
ARCHS = list(saes.ARCHITECTURES)


def _setup(arch, **kw):
    if arch.startswith("clt"):  # a cross-layer transcoder is a transcoder (here of 1 layer)
        kw.setdefault("transcoder", True)
    cfg = make_config(arch=arch, width=F, k=4, **kw)
    params = saes.init(jax.random.key(0), cfg, D, data_mean=np.full(D, 0.5, np.float32))
    x = jax.random.normal(jax.random.key(1), (B, D))
    return cfg, params, x


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(arch, compute_dtype):
    cfg, params, x = _setup(arch, compute_dtype=compute_dtype)
    assert params["W_enc"].shape == (D, F) and params["W_dec"].shape == (F, D)
    assert params["b_enc"].shape == (F,) and params["b_dec"].shape == (D,)
    assert all(p.dtype == jnp.float32 for p in params.values())
    assert set(params) == set(saes.param_axes(cfg))
    code = saes.encode(params, x, cfg)
    assert code.f.shape == code.pre.shape == (B, F) and code.f.dtype == jnp.float32
    x_hat = saes.decode(params, code.f, cfg.compute_dtype)
    assert x_hat.shape == (B, D) and x_hat.dtype == jnp.float32
    loss, aux = saes.loss(params, x, cfg)
    assert loss.shape == () and np.isfinite(loss)
    assert aux["fired"].shape == (F,)


def test_init_is_tied_and_centred():
    cfg, params, _ = _setup("relu")
    np.testing.assert_array_equal(params["W_enc"], params["W_dec"].T)
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), cfg.init_norm, rtol=1e-5)
    np.testing.assert_array_equal(params["b_dec"], 0.5)
    np.testing.assert_array_equal(params["b_enc"], 0.0)


def test_topk_has_exactly_k_active():
    cfg, params, x = _setup("topk")
    params["b_enc"] = params["b_enc"] + 10.0  # every pre-activation positive
    f = saes.encode(params, x, cfg).f
    np.testing.assert_array_equal((f > 0).sum(-1), cfg.k)


def test_batchtopk_keeps_k_times_batch_overall():
    cfg, params, x = _setup("batchtopk")
    params["b_enc"] = params["b_enc"] + 10.0
    _, aux = saes.loss(params, x, cfg)
    assert float(aux["l0"]) == pytest.approx(cfg.k)


def test_batchtopk_threshold_learns_only_from_positive_kept_activations():
    from sae_jax.saes import batchtopk

    cfg, params, x = _setup("batchtopk")
    # Few positive pre-activations: fewer than k·B survive the ReLU, so the k·B-th largest
    # activation is 0; the estimate must come from the smallest positive kept one instead.
    params["b_enc"] = params["b_enc"] - 3.0
    code = batchtopk.train_encode(params, x, cfg)
    kept = np.asarray(code.f)[np.asarray(code.f) > 0]
    assert 0 < kept.size < cfg.k * B
    assert float(code.stats["batch_threshold"]) == pytest.approx(kept.min())
    params["threshold"] = jnp.float32(0.8)
    updated = batchtopk.update_threshold(params, code.stats, cfg)["threshold"]
    assert float(updated) == pytest.approx(0.8 + batchtopk.THRESHOLD_EMA * (kept.min() - 0.8))
    # a batch that keeps nothing leaves the estimate alone (it used to pull it towards 0)
    params["b_enc"] = params["b_enc"] - 1e6
    empty = batchtopk.train_encode(params, x, cfg)
    assert not np.asarray(empty.f).any()
    def kept_estimate():
        return float(batchtopk.update_threshold(params, empty.stats, cfg)["threshold"])

    assert kept_estimate() == np.float32(0.8)
    params["threshold"] = jnp.float32(-1.0)  # not estimated yet: stays unestimated
    assert kept_estimate() == -1.0


def test_batchtopk_inference_uses_the_estimated_threshold():
    cfg, params, x = _setup("batchtopk")
    params["threshold"] = jnp.float32(0.3)
    code = saes.encode(params, x, cfg)
    np.testing.assert_array_equal(code.f > 0, code.pre > 0.3)


def test_jumprelu_zeroes_below_threshold():
    cfg, params, x = _setup("jumprelu")
    code = saes.encode(params, x, cfg)
    theta = np.exp(np.asarray(params["log_threshold"]))
    np.testing.assert_array_equal(code.f > 0, code.pre > theta)
    np.testing.assert_allclose(code.f, np.where(code.pre > theta, code.pre, 0))


def test_topk_mask_matches_lax_top_k():
    scores = jax.random.normal(jax.random.key(2), (B, F))
    _, idx = jax.lax.top_k(scores, 5)
    expected = np.zeros((B, F), bool)
    np.put_along_axis(expected, np.asarray(idx), True, axis=1)
    np.testing.assert_array_equal(topk_mask(scores, 5), expected)


def test_kth_largest():
    values = jax.random.normal(jax.random.key(3), (B, F))
    assert kth_largest(values, 10) == np.sort(np.asarray(values).ravel())[-10]


def _code(f, pre=None):
    f = jnp.asarray(f, jnp.float32)
    return Code(f if pre is None else jnp.asarray(pre, jnp.float32), f, {})


def test_l1_is_weighted_by_decoder_norms():
    params = {"W_dec": jnp.array([[3.0, 4.0], [0.0, 2.0]])}
    code = _code([[1.0, 0.5], [0.0, 2.0]])
    np.testing.assert_allclose(penalties.l1(params, code, None), [5 * 1 + 2 * 0.5, 2 * 2])


def test_tanh_saturates():
    params = {"W_dec": jnp.eye(2)}
    code = _code([[0.01, 100.0]])
    value = penalties.tanh(params, code, None)
    np.testing.assert_allclose(value, [np.tanh(penalties.TANH_SCALE * 0.01) + 1.0], rtol=1e-6)


def test_lp_is_sqrt_of_weighted_activation():
    params = {"W_dec": jnp.array([[3.0, 4.0], [0.0, 1.0]])}
    np.testing.assert_allclose(penalties.lp(params, _code([[4.0, 9.0]]), None),
                               [np.sqrt(20) + 3], rtol=1e-4)
    grad = jax.grad(lambda f: penalties.lp(params, _code(f), None).sum())(jnp.zeros((1, 2)))
    assert np.all(np.isfinite(grad)) and np.all(grad > 0)  # finite, and pushes f towards 0


def test_l0_counts_features_above_threshold():
    cfg = make_config(arch="jumprelu", width=3, k=1)
    params = {"log_threshold": jnp.log(jnp.array([0.5, 0.5, 2.0]))}
    code = _code([[1.0, 0.0, 0.0]], pre=[[1.0, 0.4, 1.5]])
    np.testing.assert_array_equal(penalties.l0(params, code, cfg), [1.0])


def test_none_is_zero():
    np.testing.assert_array_equal(penalties.none({}, _code(np.ones((2, 3))), None), [0.0, 0.0])


def test_penalty_weight_enters_the_loss():
    cfg, params, x = _setup("relu")
    ctx = lambda c: LossContext(jnp.float32(c), jnp.zeros(F, bool))  # noqa: E731
    loss0, aux = saes.loss(params, x, cfg, ctx(0.0))
    loss2, _ = saes.loss(params, x, cfg, ctx(2.0))
    assert float(loss0) == pytest.approx(float(aux["mse"]))
    assert float(loss2) == pytest.approx(float(aux["mse"] + 2.0 * aux["penalty"]), rel=1e-5)
