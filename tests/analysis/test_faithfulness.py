"""Faithfulness scores on cases whose answer is known: a linear "model" reading a residual
stream built from known atoms (the SAE of the true atoms is causally faithful, a random SAE
is not), and token explanations that are exact or meaningless."""

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.analysis import faithfulness as fa
from sae_jax.analysis.baselines import random_weights_sae
from sae_jax.config import make_config
from sae_jax.sae import SAE

D, K, N_WIN, T = 32, 16, 64, 12


def linear_model(A, h, mask):
    """Output = the masked mean of the residual stream, read out by A (d, m)."""
    m = mask[..., None].astype(h.dtype)
    return ((h * m).sum(1) / m.sum(1)) @ A


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((K, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    coef = (rng.random((N_WIN, T, K)) < 0.12) * rng.uniform(1.0, 3.0, (N_WIN, T, K))
    h = (coef @ atoms + 0.05 * rng.standard_normal((N_WIN, T, D))).astype(np.float32)
    mask = np.ones((N_WIN, T), np.int32)
    A = jnp.asarray(rng.standard_normal((D, D)), jnp.float32)
    windows = fa.Windows(h, mask, np.ones((N_WIN, T), bool),
                         fa.clean_outputs(linear_model, A, h, mask))
    params = {"W_enc": atoms.T.astype(np.float32), "b_enc": np.full(K, -0.5, np.float32),
              "W_dec": atoms.astype(np.float32), "b_dec": np.zeros(D, np.float32)}
    sae = SAE(make_config(arch="relu", width=K, compute_dtype="float32"), params, 1.0, 0)
    return windows, A, sae


def run_pipeline(world, sae):
    """The audit's causal pipeline for one SAE: activations on the windows, concept = mean
    output of each feature's 10 top windows, clamp to 2x max, decoder rows as directions."""
    windows, A, _ = world
    acts = fa.feature_columns(sae, windows.h.reshape(-1, D), np.arange(K)).T.reshape(
        K, N_WIN, T)
    top = np.argsort(-acts.max(-1), axis=1)[:, :10]
    concepts = windows.clean[top].mean(1)
    directions = np.asarray(sae.params["W_dec"]) / sae.input_scale
    return fa.causal_scores(linear_model, A, windows, acts, directions, concepts,
                            2 * acts.reshape(K, -1).max(1), np.arange(8), n_contexts=8,
                            n_random=8, batch=32)


def test_causal_scores_separate_true_atoms_from_random_sae(world):
    real = run_pipeline(world, world[2])
    control = run_pipeline(world, random_weights_sae(world[2], seed=1))
    z_real = [r["causal"] for r in real]
    z_random = [r["causal"] for r in control if r["causal"] is not None]
    assert fa.auc(z_real, z_random) > 0.9
    assert np.median(z_real) > 2.0 > np.median(z_random)
    assert np.mean([r["steer_winrate"] for r in real]) > 0.9
    # In a linear model the attribution is exact: actual = predicted effect.
    for r in real + control:
        if r["n_contexts"] >= fa.MIN_CONTEXTS:
            assert r["ablation_r"] == pytest.approx(1.0, abs=1e-4)
            assert r["ablation_cos"] == pytest.approx(1.0, abs=1e-4)


def test_ablation_effect_is_the_jvp_prediction(world):
    windows, A, sae = world
    pos, amount = np.array([3, 5], np.int32), np.array([-1.5, 2.0], np.float32)
    direction = np.asarray(sae.params["W_dec"])[:2]
    actual, predicted = fa._run_batched(fa._ablation_fn(linear_model), A,
                                        (windows.h, windows.mask, windows.splice),
                                        np.array([0, 7]), (pos, direction, amount), 4)
    expected = (amount[:, None] * direction / T) @ np.asarray(A)  # one token of T moved
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    np.testing.assert_allclose(predicted, expected, atol=1e-5)


def test_random_weights_sae_keeps_norms_not_directions(world):
    sae = world[2]
    rnd = random_weights_sae(sae, seed=3)
    for name, axis in (("W_enc", 0), ("W_dec", 1)):
        a, b = np.asarray(sae.params[name]), np.asarray(rnd.params[name])
        np.testing.assert_allclose(np.linalg.norm(a, axis=axis), np.linalg.norm(b, axis=axis),
                                   rtol=1e-5)
        assert np.abs((a * b).sum(axis) / np.linalg.norm(a, axis=axis) ** 2).max() < 0.9
    np.testing.assert_array_equal(rnd.params["b_enc"], sae.params["b_enc"])
    np.testing.assert_array_equal(random_weights_sae(sae, seed=3).params["W_dec"],
                                  rnd.params["W_dec"])


def test_explanatory_score_exact_and_random():
    rng = np.random.default_rng(0)
    vocab, n = 50, 20_000
    train_tok, held_tok = rng.integers(0, vocab, n), rng.integers(0, vocab, n)
    totals = np.bincount(train_tok, minlength=vocab)
    # A feature firing exactly on token 7 (activation 2.5): explained perfectly.
    fires = [(7, int(totals[7]))]
    expl = fa.explanation(fires, totals)
    assert expl["rates"].tolist() == [1.0]
    exact = fa.explanatory_score(np.where(held_tok == 7, 2.5, 0.0), held_tok, expl)
    assert exact == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "explanatory": 1.0}
    # A feature firing at random (5 %): its top tokens are just common tokens.
    fire_train = rng.random(n) < 0.05
    ids, counts = np.unique(train_tok[fire_train], return_counts=True)
    top = sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: -t[1])[:10]
    held_acts = np.where(rng.random(n) < 0.05, rng.uniform(1, 3, n), 0.0)
    rand = fa.explanatory_score(held_acts, held_tok, fa.explanation(top, totals))
    assert abs(rand["explanatory"]) < 0.05
    assert rand["precision"] < 0.1 and rand["recall"] < 0.3
    # Nothing predicted -> 0; never fires -> undefined.
    none = fa.explanatory_score(held_acts, held_tok, fa.explanation([], totals))
    assert none == {"precision": None, "recall": 0.0, "f1": 0.0, "explanatory": 0.0}
    assert fa.explanatory_score(np.zeros(n), held_tok, expl)["explanatory"] is None


def test_small_statistics():
    assert fa.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert fa.pearson([1, 1, 1], [1, 2, 3]) == 0.0 and fa.pearson([1, 2], [3, 3]) is None
    assert fa.auc([3, 4], [1, 2]) == 1.0 and fa.auc([1, 2], [3, 4]) == 0.0
    assert fa.auc([1, 2], [1, 2]) == 0.5 and fa.auc([None], [1]) is None
    s = fa.steering_score(np.array([3.0, 0.0, 1.0, -1.0, 3.0]))
    assert s["steer_gain"] == 3.0 and s["steer_winrate"] == pytest.approx(0.875)
    assert s["steer_z"] == pytest.approx((3.0 - 0.75) / np.std([0, 1, -1, 3], ddof=1))
    acts = np.zeros((3, 5))
    acts[0, 1], acts[1, 2], acts[2, 0], acts[2, 4] = 1.0, 5.0, 3.0, 2.0
    splice = np.ones((3, 5), bool)
    w, p = fa.choose_contexts(acts, splice, 2)  # weakest and strongest
    assert list(zip(w, p)) == [(0, 1), (1, 2)]
    splice[1, 2] = False
    w, p = fa.choose_contexts(acts, splice, 8)
    assert list(zip(w, p)) == [(0, 1), (2, 4), (2, 0)]
