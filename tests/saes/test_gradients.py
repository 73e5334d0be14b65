"""Gradients of the SAE losses, checked against hand derivations and finite differences.

* JumpReLU straight-through estimators against the Gemma Scope pseudo-derivatives.
* The full jumprelu loss: ∂/∂log_threshold by the chain rule, the dictionary params by
  central finite differences.
* The relu + l1 loss by finite differences.
* The TopK AuxK loss: value (numpy re-implementation), sparsity pattern of its gradient,
  and finite differences.
* Sharded (data:2,model:4) and unsharded loss + gradients agree.

Everything is float32 on CPU. Central differences use a power-of-two step so `p ± eps` is
exact; data are chosen so no pre-activation is near a kink (ReLU at 0, JumpReLU at θ), where
the losses are piecewise quadratic in each single param and central differences are exact up
to rounding.
"""

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from sae_jax import saes
from sae_jax.config import make_config
from sae_jax.mesh import batch_sharding, logical_to_sharding, make_mesh
from sae_jax.saes import jumprelu, topk
from sae_jax.saes.common import LossContext, decode

FD_EPS = 2.0**-7


# ---------------------------------------------------------------------------------------
# helpers


def _rect(u):
    return (np.abs(u) < 0.5).astype(np.float64)


def _params(seed, d_in, width, scale=0.5, extra=None):
    """Random untied float32 dictionary params (all four nonzero, so every term matters)."""
    rng = np.random.default_rng(seed)
    p = {
        "W_enc": scale * rng.normal(size=(d_in, width)),
        "b_enc": 0.1 * rng.normal(size=width),
        "W_dec": scale * rng.normal(size=(width, d_in)),
        "b_dec": 0.1 * rng.normal(size=d_in),
        **(extra or {}),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# jitted entry points (op-by-op dispatch would compile every primitive separately)
_encode = jax.jit(saes.encode, static_argnames="cfg")
_loss = jax.jit(lambda p, x, cfg, ctx=None: saes.loss(p, x, cfg, ctx), static_argnames="cfg")
_loss_value = jax.jit(lambda p, x, cfg, ctx=None: saes.loss(p, x, cfg, ctx)[0],
                      static_argnames="cfg")
_loss_grad = jax.jit(jax.grad(lambda p, x, cfg, ctx=None: saes.loss(p, x, cfg, ctx)[0]),
                     static_argnames="cfg")


def _inputs_away_from(params, cfg, batch, d_in, kinks, margin, seed):
    """A (batch, d_in) input whose pre-activations are all > `margin` from `kinks`.

    `kinks` is (F,) or (n, F) (several kink locations per feature). Rows are redrawn until
    they qualify, so the data are random but kink-free.
    """
    kinks = np.atleast_2d(np.asarray(kinks, np.float64))[:, None, :]  # (n, 1, F)
    rng = np.random.default_rng(seed)
    W_enc, b_enc, b_dec = (np.asarray(params[n], np.float64) for n in ("W_enc", "b_enc", "b_dec"))
    rows = []
    for _ in range(100_000):
        x = rng.normal(size=d_in)
        h = (x - b_dec) @ W_enc + b_enc
        if np.min(np.abs(h - kinks)) > margin:
            rows.append(x)
            if len(rows) == batch:
                break
    assert len(rows) == batch, "could not draw kink-free rows"
    x = jnp.asarray(np.stack(rows), jnp.float32)
    pre = np.asarray(_encode(params, x, cfg).pre, np.float64)
    assert np.min(np.abs(pre[None] - kinks)) > margin * 0.99
    return x


def _central_fd(f, params, name, eps=FD_EPS):
    """∂f/∂params[name] by central differences, one element at a time (vmapped)."""
    p = params[name]
    basis = (eps * jnp.eye(p.size, dtype=jnp.float32)).reshape(p.size, *p.shape)
    f_at = jax.jit(jax.vmap(lambda d: f({**params, name: p + d})))
    return np.asarray((f_at(basis) - f_at(-basis)) / (2 * eps)).reshape(p.shape)


def _assert_grad_close(got, want, rtol=2e-4, name=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want))
    assert scale > 1e-3, f"{name}: reference gradient is (near) zero, the check would be vacuous"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


# ---------------------------------------------------------------------------------------
# 1. the straight-through estimators

EPS_BW = 0.5  # bandwidth ε: window |h − θ| < 0.25
THETA = np.array([1.0, 0.5, 2.0, 0.25], np.float32)
# rows chosen per column: inside / outside the window, on either side of θ, exactly at θ,
# exactly on the (open) window edge |h − θ| = ε/2 (all values exact in float32).
H = np.array(
    [
        [1.1, 0.5, 3.0, 0.0],     # in(+), at θ, out(+), at −θ (out)
        [0.9, 0.7, 1.9, 0.375],   # in(−), in(+), in(−), in(+)
        [1.25, 0.25, 2.25, 0.5],  # edge(+), edge(−), edge(+), edge(+)
        [-3.0, 0.74, 1.74, 0.26],  # out(−), in(+), out(−), in(+)
        [1.0, 5.0, 2.0, -1.0],    # at θ, out(+), at θ, out(−)
    ],
    np.float32,
)
G = np.arange(1, H.size + 1, dtype=np.float32).reshape(H.shape) / 7.0  # distinct cotangents


def _expected_ste(h, theta, g, eps):
    """Gemma Scope pseudo-derivatives, in float64 numpy: returns (jr_h, jr_t, step_h, step_t)."""
    h, theta, g = (np.asarray(a, np.float64) for a in (h, theta, g))
    k = _rect((h - theta) / eps)
    jr_h = (h > theta) * g
    jr_t = -(theta / eps) * k * g
    step_t = -(1.0 / eps) * k * g
    return jr_h, jr_t, np.zeros_like(h), step_t


def test_rectangle_kernel_window_cases():
    """The hand-built grid really covers inside, outside, edge and at-θ points."""
    u = (H.astype(np.float64) - THETA) / EPS_BW
    assert np.sum(np.abs(u) < 0.5) >= 8
    assert np.sum(np.abs(u) > 0.5) >= 5
    assert np.sum(np.abs(u) == 0.5) >= 4
    assert np.sum(u == 0) >= 3


def test_jumprelu_ste_elementwise():
    """θ with the shape of h: ∂/∂h = H(h−θ)·g, ∂/∂θ = −(θ/ε)·rect((h−θ)/ε)·g elementwise."""
    theta = np.broadcast_to(THETA, H.shape).copy()
    out, vjp = jax.vjp(lambda h, t: jumprelu.jumprelu(h, t, EPS_BW), jnp.asarray(H),
                       jnp.asarray(theta))
    np.testing.assert_array_equal(out, H * (H > theta))  # forward: 0 at h == θ (strict)
    gh, gt = vjp(jnp.asarray(G))
    jr_h, jr_t, _, _ = _expected_ste(H, theta, G, EPS_BW)
    np.testing.assert_allclose(gh, jr_h, rtol=1e-6, atol=0)
    np.testing.assert_allclose(gt, jr_t, rtol=1e-6, atol=0)
    # concrete spot values: in-window point h=1.1, θ=1: −(1/0.5)·g; at h=θ=0.5: −(0.5/0.5)·g
    assert gt[0, 0] == pytest.approx(-2.0 * G[0, 0], rel=1e-6)
    assert gt[0, 1] == pytest.approx(-1.0 * G[0, 1], rel=1e-6)
    assert gh[0, 1] == 0.0 and gh[0, 0] == G[0, 0]  # at θ: not active, no h-gradient
    assert gt[0, 2] == 0.0 and gt[2, 0] == 0.0  # outside the window / on its open edge


def test_jumprelu_ste_threshold_broadcast_sums_over_batch():
    """θ (F,) broadcast over a (B, F) batch: its gradient is the batch sum."""
    gh, gt = jax.vjp(lambda h, t: jumprelu.jumprelu(h, t, EPS_BW), jnp.asarray(H),
                     jnp.asarray(THETA))[1](jnp.asarray(G))
    jr_h, jr_t, _, _ = _expected_ste(H, THETA, G, EPS_BW)
    assert gt.shape == THETA.shape
    np.testing.assert_allclose(gh, jr_h, rtol=1e-6, atol=0)
    np.testing.assert_allclose(gt, jr_t.sum(0), rtol=1e-6, atol=1e-7)
    # column 0: window rows are h=1.1 (row 0), 0.9 (row 1), 1.0 (row 4)
    want0 = -(1.0 / EPS_BW) * (G[0, 0] + G[1, 0] + G[4, 0])
    assert float(gt[0]) == pytest.approx(want0, rel=1e-6)


def test_jumprelu_ste_through_jax_grad():
    """`jax.grad` of a sum (cotangent of ones) gives the same pseudo-derivatives."""
    gh, gt = jax.grad(lambda h, t: jumprelu.jumprelu(h, t, EPS_BW).sum(), argnums=(0, 1))(
        jnp.asarray(H), jnp.asarray(THETA))
    jr_h, jr_t, _, _ = _expected_ste(H, THETA, np.ones_like(H), EPS_BW)
    np.testing.assert_array_equal(gh, jr_h)
    np.testing.assert_allclose(gt, jr_t.sum(0), rtol=1e-6)


def test_step_ste_elementwise_and_broadcast():
    """step: forward H(h−θ); ∂/∂h = 0; ∂/∂θ = −(1/ε)·rect((h−θ)/ε)·g, batch-summed for (F,)."""
    _, _, st_h, st_t = _expected_ste(H, THETA, G, EPS_BW)
    out, vjp = jax.vjp(lambda h, t: jumprelu.step(h, t, EPS_BW), jnp.asarray(H),
                       jnp.asarray(THETA))
    np.testing.assert_array_equal(out, (H > THETA).astype(np.float32))
    gh, gt = vjp(jnp.asarray(G))
    np.testing.assert_array_equal(gh, st_h)
    np.testing.assert_allclose(gt, st_t.sum(0), rtol=1e-6, atol=1e-7)
    # column 3 (θ=0.25): window rows 1 (0.375) and 3 (0.26); h=0.5 is on the open edge.
    assert float(gt[3]) == pytest.approx(-(1 / EPS_BW) * (G[1, 3] + G[3, 3]), rel=1e-6)
    # full-shape θ: no summing
    theta = np.broadcast_to(THETA, H.shape).copy()
    gt_full = jax.vjp(lambda t: jumprelu.step(jnp.asarray(H), t, EPS_BW), jnp.asarray(theta))[1](
        jnp.asarray(G))[0]
    np.testing.assert_allclose(gt_full, st_t, rtol=1e-6, atol=0)


def test_ste_scalar_threshold_and_bandwidth_scaling():
    """A scalar θ sums over everything; halving ε doubles the in-window density."""
    h = jnp.asarray(H[:, 0])
    for eps in (0.5, 0.25):
        gt = jax.grad(lambda t: jumprelu.step(h, t, eps).sum())(jnp.float32(1.0))
        n_in = np.sum(np.abs((H[:, 0].astype(np.float64) - 1.0) / eps) < 0.5)
        assert float(gt) == pytest.approx(-n_in / eps, rel=1e-6)
    # eps=0.5: 1.1, 0.9, 1.0 in window (3 → −6); eps=0.25: window 0.125: same 3 → −12
    assert float(jax.grad(lambda t: jumprelu.step(h, t, 0.25).sum())(jnp.float32(1.0))) == -12.0


def test_step_ste_threshold_broadcast_along_features():
    """θ of shape (B, 1) (one threshold per row): gradient summed over the feature axis."""
    h = jnp.array([[1.01, 1.02, 1.03], [0.5, 3.0, 5.0]], jnp.float32)
    gt = jax.grad(lambda t: jumprelu.step(h, t, 0.1).sum())(jnp.ones((2, 1), jnp.float32))
    np.testing.assert_allclose(np.asarray(gt).ravel(), [-30.0, 0.0])


# ---------------------------------------------------------------------------------------
# 2. the full jumprelu loss

D_IN, WIDTH, BATCH = 12, 24, 16


def _jumprelu_setup(bandwidth, seed=0, sparsity_coeff=0.3):
    cfg = make_config(arch="jumprelu", width=WIDTH, k=4, bandwidth=bandwidth,
                      sparsity_coeff=sparsity_coeff)
    theta = np.linspace(0.3, 0.9, WIDTH).astype(np.float32)
    params = _params(seed, D_IN, WIDTH,
                     extra={"log_threshold": jnp.log(jnp.asarray(theta))})
    theta = np.asarray(jumprelu.threshold(params), np.float64)
    return cfg, params, theta


def test_jumprelu_loss_grad_log_threshold_matches_hand_derivation():
    """∂loss/∂log θ_i = θ_i · Σ_b [∂mse/∂f_bi · (−θ_i/ε) K_bi − (λ/B)(1/ε) K_bi],
    with ∂mse/∂f = (2/B)(x̂ − x) W_decᵀ and K = rect((h − θ)/ε)."""
    eps = 0.4
    cfg, params, theta = _jumprelu_setup(eps)
    # inputs kept 1e-3 away from θ and from the window edges θ ± ε/2 (rounding-safe)
    kinks = np.stack([theta, theta - eps / 2, theta + eps / 2])
    x = _inputs_away_from(params, cfg, BATCH, D_IN, kinks, margin=1e-3, seed=1)
    h = np.asarray(_encode(params, x, cfg).pre, np.float64)

    grads = _loss_grad(params, x, cfg)

    W_dec, b_dec = (np.asarray(params[n], np.float64) for n in ("W_dec", "b_dec"))
    xs = np.asarray(x, np.float64)
    lam, B = cfg.sparsity_coeff, BATCH
    K = _rect((h - theta) / eps)
    f = h * (h > theta)
    x_hat = f @ W_dec + b_dec
    dL_df = (2.0 / B) * (x_hat - xs) @ W_dec.T
    dL_dtheta = (dL_df * (-(theta / eps)) * K).sum(0) + (lam / B) * (-(1.0 / eps) * K).sum(0)
    want = theta * dL_dtheta

    assert K.sum() >= 20 and (K.sum(0) == 0).any(), "want features both in and out of window"
    np.testing.assert_allclose(grads["log_threshold"], want, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grads["log_threshold"])[K.sum(0) == 0] == 0.0)
    # in-window pre-activations must not leak an h-gradient from the L0 step (∂step/∂h = 0)
    ref = jax.jit(jax.grad(_reference_jumprelu_loss), static_argnums=2)(params, x, cfg)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        _assert_grad_close(grads[name], ref[name], rtol=1e-5, name=name)
    # the penalty part alone (λ term) is a count: check it separately via λ → 2λ
    cfg2 = make_config(arch="jumprelu", width=WIDTH, k=4, bandwidth=eps, sparsity_coeff=2 * lam)
    g2 = _loss_grad(params, x, cfg2)["log_threshold"]
    np.testing.assert_allclose(np.asarray(g2) - np.asarray(grads["log_threshold"]),
                               theta * (lam / B) * (-(1.0 / eps) * K).sum(0), rtol=1e-4,
                               atol=1e-6)


def _jumprelu_fd_setup():
    cfg, params, theta = _jumprelu_setup(0.05, seed=2)
    x = _inputs_away_from(params, cfg, BATCH, D_IN, theta, margin=0.08, seed=3)
    h = np.asarray(_encode(params, x, cfg).pre)
    assert 0.1 < np.mean(h > theta) < 0.9  # a real mix of active and inactive units
    return cfg, params, x


def _reference_jumprelu_loss(params, x, cfg):
    """The jumprelu training loss in plain jnp: mse + λ·mean L0 (no custom VJPs)."""
    theta = jnp.exp(params["log_threshold"])
    h = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    active = jax.lax.stop_gradient((h > theta).astype(jnp.float32))
    x_hat = (h * active) @ params["W_dec"] + params["b_dec"]
    return jnp.mean(jnp.sum((x - x_hat) ** 2, -1)) + cfg.sparsity_coeff * active.sum(-1).mean()


@pytest.mark.parametrize("name", ["W_enc", "b_enc", "W_dec", "b_dec"])
def test_jumprelu_loss_grad_dictionary_matches_finite_differences(name):
    """Away from θ the loss is smooth in the dictionary params: STE = true gradient."""
    cfg, params, x = _jumprelu_fd_setup()
    f = jax.jit(lambda p: saes.loss(p, x, cfg)[0])
    grads = jax.jit(jax.grad(f))(params)
    _assert_grad_close(grads[name], _central_fd(f, params, name), name=name)
    ref = jax.jit(jax.grad(_reference_jumprelu_loss), static_argnums=2)(params, x, cfg)
    _assert_grad_close(grads[name], ref[name], rtol=1e-5, name=name + " vs reference")
    assert float(f(params)) == pytest.approx(float(_reference_jumprelu_loss(params, x, cfg)),
                                             rel=1e-6)


# ---------------------------------------------------------------------------------------
# 3. relu + l1


def _relu_setup():
    cfg = make_config(arch="relu", width=WIDTH, k=4, sparsity_coeff=0.7)
    assert cfg.penalty == "l1"
    params = _params(4, D_IN, WIDTH)
    x = _inputs_away_from(params, cfg, BATCH, D_IN, np.zeros(WIDTH), margin=0.08, seed=5)
    return cfg, params, x


@pytest.mark.parametrize("name", ["W_enc", "b_enc", "W_dec", "b_dec"])
def test_relu_l1_loss_grad_matches_finite_differences(name):
    cfg, params, x = _relu_setup()
    f = jax.jit(lambda p: saes.loss(p, x, cfg)[0])
    grads = jax.jit(jax.grad(f))(params)
    # W_dec enters through ‖W_dec,i‖ too (not quadratic): O(eps²) truncation, looser rtol
    _assert_grad_close(grads[name], _central_fd(f, params, name), rtol=1e-3, name=name)


def test_relu_l1_loss_value_and_check_grads():
    """Value equals mse + λ·mean Σ_i relu(h_i)·‖W_dec,i‖, and jax's own FD check passes."""
    cfg, params, x = _relu_setup()
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs = np.asarray(x, np.float64)
    f = np.maximum((xs - p64["b_dec"]) @ p64["W_enc"] + p64["b_enc"], 0)
    x_hat = f @ p64["W_dec"] + p64["b_dec"]
    want = (np.mean(np.sum((xs - x_hat) ** 2, -1))
            + 0.7 * np.mean(f @ np.linalg.norm(p64["W_dec"], axis=1)))
    assert float(_loss_value(params, x, cfg)) == pytest.approx(want, rel=1e-5)
    jax.test_util.check_grads(jax.jit(lambda p: saes.loss(p, x, cfg)[0]), (params,), order=1,
                              modes=("rev",), eps=2.0**-10, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------
# 4. TopK AuxK

AUX_K = 3


def _topk_setup(dead_idx, seed=6, aux_k=AUX_K):
    cfg = make_config(arch="topk", width=WIDTH, k=4, aux_k=aux_k)
    params = _params(seed, D_IN, WIDTH)
    x = _normal(seed + 1, (BATCH, D_IN))
    dead = np.zeros(WIDTH, bool)
    dead[list(dead_idx)] = True
    ctx = LossContext(jnp.float32(0.0), jnp.asarray(dead))
    return cfg, params, x, ctx, dead


def _auxk_of(params, x, ctx, cfg, x_hat=None, code=None):
    """AuxK as the loss calls it; `x_hat`/`code` may be frozen (for finite differences)."""
    code = topk.encode(params, x, cfg) if code is None else code
    if x_hat is None:
        x_hat = decode(params, code.f)
    return topk.auxk_loss(params, x, x, x_hat, code, ctx, cfg)


_auxk_jit = jax.jit(_auxk_of, static_argnums=3)
_auxk_grad = jax.jit(jax.grad(_auxk_of), static_argnums=3)


def _auxk_numpy(params, x, cfg, dead, aux_k):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs = np.asarray(x, np.float64)
    h = (xs - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = np.zeros_like(h)
    top = np.argsort(-h, axis=1)[:, : cfg.k]
    np.put_along_axis(f, top, np.maximum(np.take_along_axis(h, top, 1), 0), 1)
    e = xs - (f @ p["W_dec"] + p["b_dec"])
    dead_idx = np.flatnonzero(dead)
    f_aux = np.zeros_like(h)
    for b in range(h.shape[0]):
        chosen = dead_idx[np.argsort(-h[b, dead_idx])[:aux_k]]
        f_aux[b, chosen] = np.maximum(h[b, chosen], 0)
    e_hat = f_aux @ p["W_dec"]
    return np.mean(np.sum((e_hat - e) ** 2, axis=1)), f_aux  # in the main MSE's units


def test_auxk_zero_without_dead_latents():
    cfg, params, x, ctx, _ = _topk_setup([])
    value, grads = jax.jit(jax.value_and_grad(_auxk_of), static_argnums=3)(params, x, ctx, cfg)
    assert float(value) == 0.0
    for name, g in grads.items():
        assert np.all(np.asarray(g) == 0.0), name
    # and through the whole loss: the aux term reports 0
    assert float(_loss(params, x, cfg, ctx)[1]["aux_loss"]) == 0.0


@pytest.mark.parametrize("dead_idx", [(1, 5, 8, 13, 17, 22), (3, 20)],
                         ids=["more_dead_than_aux_k", "fewer_dead_than_aux_k"])
def test_auxk_value_matches_numpy(dead_idx):
    cfg, params, x, ctx, dead = _topk_setup(dead_idx)
    want, f_aux = _auxk_numpy(params, x, cfg, dead, AUX_K)
    assert np.count_nonzero(f_aux) > BATCH // 2  # dead latents do contribute
    assert float(_auxk_jit(params, x, ctx, cfg)) == pytest.approx(want, rel=1e-5)
    # the default aux_k is d_in // 2
    cfg_default = make_config(arch="topk", width=WIDTH, k=4)
    want_default, _ = _auxk_numpy(params, x, cfg_default, dead, D_IN // 2)
    assert float(_auxk_jit(params, x, ctx, cfg_default)) == pytest.approx(want_default, rel=1e-5)
    # and it enters the total loss with weight aux_coeff
    total, aux = _loss(params, x, cfg, ctx)
    assert float(aux["aux_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(total) == pytest.approx(float(aux["mse"]) + cfg.aux_coeff * want, rel=1e-5)


def test_auxk_grad_only_on_dead_latents():
    dead_idx = (1, 5, 8, 13, 17, 22)
    cfg, params, x, ctx, dead = _topk_setup(dead_idx)
    grads = _auxk_grad(params, x, ctx, cfg)
    _, f_aux = _auxk_numpy(params, x, cfg, dead, AUX_K)
    used = f_aux.any(0)  # dead latents selected (with positive pre) in some row
    assert used.sum() >= 3

    g_dec = np.abs(np.asarray(grads["W_dec"])).sum(1)
    g_enc = np.abs(np.asarray(grads["W_enc"])).sum(0)
    g_benc = np.abs(np.asarray(grads["b_enc"]))
    for g, what in ((g_dec, "W_dec rows"), (g_enc, "W_enc columns"), (g_benc, "b_enc")):
        assert np.all(g[~dead] == 0.0), f"{what}: gradient on live latents"
        assert np.all(g[used] > 0.0), f"{what}: no gradient on a used dead latent"
        assert np.all(g[dead & ~used] == 0.0), f"{what}: gradient on an unused dead latent"
    assert np.any(np.asarray(grads["b_dec"]) != 0.0)  # b_dec shifts the dead pre-activations


def test_auxk_grad_w_dec_matches_finite_differences():
    """With x̂ (the stop-gradient residual) frozen, AuxK is quadratic in W_dec."""
    cfg, params, x, ctx, _ = _topk_setup((1, 5, 8, 13, 17, 22))
    code = _encode(params, x, cfg)
    x_hat = jax.jit(decode)(params, code.f)
    f = jax.jit(lambda p: _auxk_of(p, x, ctx, cfg, x_hat=x_hat, code=code))
    g = jax.jit(jax.grad(f))(params)["W_dec"]
    # exactly quadratic in W_dec, so a large step has no truncation error and less rounding
    _assert_grad_close(g, _central_fd(f, params, "W_dec", eps=2.0**-3), rtol=1e-4, name="W_dec")
    # and the un-frozen function has the same gradient (the residual is a stop-gradient)
    g_full = _auxk_grad(params, x, ctx, cfg)["W_dec"]
    np.testing.assert_allclose(g_full, g, rtol=1e-6, atol=1e-7)
    # closed form: ∂/∂W_dec = 2 f_auxᵀ(ê − e) / B (the mean over rows of ‖ê − e‖²)
    _, f_aux = _auxk_numpy(params, x, cfg, np.asarray(ctx.dead), AUX_K)
    e = np.asarray(x, np.float64) - np.asarray(x_hat, np.float64)
    W = np.asarray(params["W_dec"], np.float64)
    want = 2 * f_aux.T @ (f_aux @ W - e) / len(e)
    _assert_grad_close(g, want, rtol=1e-4, name="W_dec closed form")


# ---------------------------------------------------------------------------------------
# 5. sharded == unsharded


def _sharded_case(arch):
    width, batch = 32, 16
    if arch == "jumprelu":
        cfg = make_config(arch="jumprelu", width=width, bandwidth=0.2, sparsity_coeff=0.3)
        extra = {"log_threshold": jnp.log(jnp.linspace(0.2, 0.8, width, dtype=jnp.float32))}
        dead = np.zeros(width, bool)
    elif arch == "batchtopk":
        cfg = make_config(arch="batchtopk", width=width, k=4, aux_k=3, aux_coeff=0.5)
        extra = {"threshold": jnp.float32(-1.0)}
        dead = np.isin(np.arange(width), [0, 7, 9, 14, 23, 30])
    else:
        cfg = make_config(arch="topk", width=width, k=4, aux_k=3, aux_coeff=0.5)
        extra = {}
        dead = np.isin(np.arange(width), [0, 7, 9, 14, 23, 30])  # spread over all 4 shards
    params = _params(8, D_IN, width, extra=extra)
    x = _normal(9, (batch, D_IN))
    ctx = LossContext(jnp.float32(cfg.sparsity_coeff), jnp.asarray(dead))
    return cfg, params, x, ctx


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "batchtopk"])
def test_sharded_loss_and_grads_match_unsharded(arch):
    cfg, params, x, ctx = _sharded_case(arch)
    mesh = make_mesh("data:2,model:4")

    def value_and_grad(mesh):
        f = functools.partial(saes.loss, cfg=cfg, mesh=mesh)
        return jax.jit(jax.value_and_grad(lambda p, x, c: f(p, x, ctx=c), has_aux=True))

    (loss0, aux0), g0 = value_and_grad(None)(params, x, ctx)
    p_sh = jax.device_put(params, logical_to_sharding(saes.param_axes(cfg), mesh))
    x_sh = jax.device_put(x, batch_sharding(mesh))
    (loss1, aux1), g1 = value_and_grad(mesh)(p_sh, x_sh, ctx)

    assert len(p_sh["W_enc"].sharding.device_set) == 8
    assert float(loss1) == pytest.approx(float(loss0), rel=1e-5)
    for key in ("mse", "penalty", "aux_loss", "l0"):
        assert float(aux1[key]) == pytest.approx(float(aux0[key]), rel=1e-5, abs=1e-7), key
    if arch != "jumprelu":
        assert float(aux0["aux_loss"]) > 0.0  # the AuxK path is exercised
    for name in g0:
        a, b = np.asarray(g0[name]), np.asarray(g1[name])
        scale = max(np.max(np.abs(a)), 1e-30)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
    nonzero = [n for n in g0 if np.any(np.asarray(g0[n]) != 0)]
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"log_threshold"} if arch == "jumprelu"
                                                       else set())
    assert set(nonzero) == expected


# ---------------------------------------------------------------------------------------
# 6. the sparse TopK training path against the dense reference


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_sparse_topk_path_equals_dense_reference(compute_dtype):
    """Sparse codes (gathers + hand-written VJP) give the dense path's loss and gradients,
    including AuxK over dead latents."""
    from sae_jax.saes import sparse, topk

    cfg = make_config(arch="topk", width=48, k=5, aux_k=7, compute_dtype=compute_dtype)
    params = _params(3, 12, 48)
    x = jax.random.normal(jax.random.key(9), (32, 12)) * 2 + 0.3
    dead = jnp.arange(48) % 3 == 0
    ctx = LossContext(jnp.float32(0.0), dead)

    def dense_loss(p):
        code = topk.encode(p, x, cfg)
        x_hat = code.f @ p["W_dec"] + p["b_dec"] if compute_dtype == "float32" else \
            saes.decode(p, code.f, compute_dtype)
        mse = jnp.sum((x - x_hat) ** 2, -1).mean()
        return mse + cfg.aux_coeff * topk.auxk_loss(p, x, x, x_hat, code, ctx, cfg)

    def sparse_loss(p):
        assert sparse.usable(None)
        return saes.loss(p, x, cfg, ctx)[0]

    tol = 1e-5 if compute_dtype == "float32" else 2e-2  # bf16: different summation orders
    assert float(sparse_loss(params)) == pytest.approx(float(dense_loss(params)), rel=tol)
    g_dense, g_sparse = jax.grad(dense_loss)(params), jax.grad(sparse_loss)(params)
    for name in g_dense:
        scale = float(jnp.abs(g_dense[name]).max())
        np.testing.assert_allclose(g_sparse[name], g_dense[name], rtol=0, atol=tol * scale,
                                   err_msg=name)
    assert float(jnp.abs(g_sparse["W_enc"][:, dead]).max()) > 0  # AuxK reached dead columns


def test_sparse_path_can_be_disabled_for_reference():
    from sae_jax.saes import sparse, topk

    cfg = make_config(arch="topk", width=48, k=5)
    params = _params(4, 12, 48)
    x = jax.random.normal(jax.random.key(2), (16, 12))
    assert topk.train_encode(params, x, cfg).idx is not None
    with sparse.disabled():
        assert not sparse.usable(None)
        code = topk.train_encode(params, x, cfg)
        dense_loss = saes.loss(params, x, cfg)[0]
    assert code.idx is None and sparse.usable(None)
    assert float(saes.loss(params, x, cfg)[0]) == pytest.approx(float(dense_loss), rel=1e-5)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_centre_gradient_as_a_mat_vec_equals_the_baseline_matmul(compute_dtype):
    """`common.centered_matmul` takes b_dec's encoder gradient as −(Σ_b g) @ Wᵀ instead of
    summing a (batch, F) × (F, d) matmul: the loss is bit-identical (same forward) and every
    gradient agrees with the baseline step's (`common.baseline()`)."""
    from sae_jax.saes.common import baseline

    cfg = make_config(arch="relu", width=48, sparsity_coeff=0.1, compute_dtype=compute_dtype)
    params = _params(5, 12, 48)
    x = _normal(6, (32, 12)) * 2 + 0.3
    grad = jax.value_and_grad(lambda p: saes.loss(p, x, cfg)[0])
    (loss, g_new) = grad(params)
    with baseline():
        (loss_old, g_old) = jax.value_and_grad(lambda p: saes.loss(p, x, cfg)[0])(params)
    assert float(loss) == float(loss_old)
    tol = 1e-5 if compute_dtype == "float32" else 2e-2  # bf16: the old one rounded in bf16
    for name in g_old:
        scale = float(jnp.abs(g_old[name]).max())
        np.testing.assert_allclose(g_new[name], g_old[name], rtol=0, atol=tol * scale,
                                   err_msg=name)
    assert float(jnp.abs(g_new["b_dec"]).max()) > 0
