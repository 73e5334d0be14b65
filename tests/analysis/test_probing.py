"""k-sparse probing with known answers: the logistic probe is the optimum of its objective, a
label planted in one latent is found at k=1, a random label stays at chance."""

import numpy as np
import pytest
from conftest import relu_sae

from sae_jax.analysis.probe_fit import (
    balanced_indices,
    class_means,
    f1_score,
    fit_logistic,
    latent_columns,
    logistic_objective,
    top_latents,
)
from sae_jax.analysis.probing import make_tasks, probe_tasks, summarize


@pytest.mark.parametrize("balanced", [False, True])
def test_logistic_probe_is_the_optimum_by_newton_and_by_lbfgs(balanced):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)) * [1, 2, 3, 0.5, 1, 10]
    y = (x @ [1, -1, 0.5, 2, 0, 0.1] + rng.standard_normal(400) > 1.0)
    newton = fit_logistic(x, y, balanced=balanced)
    lbfgs = fit_logistic(x, y, balanced=balanced, newton_max_dim=0)
    np.testing.assert_allclose(newton.w, lbfgs.w, atol=2e-4)
    assert newton.b == pytest.approx(lbfgs.b, abs=2e-4)
    s = np.ones(len(y))
    if balanced:
        s = np.where(y, len(y) / (2 * y.sum()), len(y) / (2 * (~y).sum()))
    xa = np.concatenate([x, np.ones((len(x), 1))], 1)
    _, grad, _ = logistic_objective(np.append(newton.w, newton.b), xa, y.astype(float), s,
                                    1.0)
    assert np.max(np.abs(grad)) < 1e-5
    assert 0.8 < np.mean(newton.predict(x) == y) < 1.0


def test_separable_data_gives_a_finite_perfect_probe():
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    probe = fit_logistic(x, np.array([0, 0, 1, 1]))
    assert np.isfinite(probe.w).all() and list(probe.predict(x)) == [False, False, True, True]


def test_selection_helpers():
    assert top_latents([1, 5, 0, 2], [1, 0, 4, 2], 2).tolist() == [1, 2]  # |diff| 5, 4
    assert top_latents([1, 5, 0, 2], [1, 0, 4, 2], 2, signed=True).tolist() == [1, 0]
    assert f1_score([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert f1_score([0, 0], [1, 0]) == 0.0
    rows = balanced_indices(np.arange(10), np.arange(10, 13), 100, np.random.default_rng(0))
    assert len(rows) == 6 and (rows >= 10).sum() == 3
    x = np.arange(12, dtype=np.float32).reshape(6, 2)

    def enc(b):
        return np.concatenate([b, -b], 1)

    groups = np.array([[1, 0], [1, 0], [0, 1], [0, 0], [0, 1], [0, 0]], bool)
    np.testing.assert_allclose(class_means(enc, x, groups, batch=4),
                               [[1, 2, -1, -2], [6, 7, -6, -7]])
    np.testing.assert_allclose(latent_columns(enc, x, [3, 0], batch=4), enc(x)[:, [3, 0]])


def test_planted_label_is_found_at_k1_and_a_random_label_is_chance():
    rng = np.random.default_rng(1)
    n, d, width, planted = 3000, 16, 32, 7
    y = rng.random(n) < 0.3
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, 0] = np.where(y, 2.0, 0.0) + 0.3 * rng.standard_normal(n)
    # random latents that do not see coordinate 0, and one latent that reads exactly it
    w_enc = rng.standard_normal((d, width)) / np.sqrt(d)
    w_enc[0] = 0.0
    w_enc[:, planted] = np.eye(d)[0]
    b_enc = np.full(width, -0.5)
    b_enc[planted] = -1.0
    sae = relu_sae(w_enc, b_enc, w_enc.T)
    labels = {"planted": (y.astype(np.int32), ["no", "yes"]),
              "noise": (rng.integers(0, 3, n).astype(np.int32), ["a", "b", "c"])}
    test = rng.random(n) < 0.3
    tasks = make_tasks(labels, test)
    assert sorted(t.name for t in tasks) == ["noise=a", "noise=b", "noise=c", "planted=yes"]
    result = probe_tasks(sae, x, tasks)
    p = result["planted=yes"]
    assert p["latents"][0] == planted
    assert p["k1"] > 0.97 and p["raw"] > 0.97
    assert p["n_train"] == 2 * int((y & ~test).sum())  # balanced: all positives, as many negatives
    for name in ("noise=a", "noise=b", "noise=c"):
        for key in ("k1", "k5", "k20", "raw"):
            assert abs(result[name][key] - 0.5) < 0.08, (name, key, result[name][key])
    metrics = summarize(result)
    assert set(metrics) == {"probe_acc_k1", "probe_acc_k2", "probe_acc_k5", "probe_acc_k20",
                            "probe_acc_raw"}
    assert metrics["probe_acc_k1"] == pytest.approx(
        np.mean([r["k1"] for r in result.values()]))
    assert summarize({})["probe_acc_k1"] is None


def test_rare_classes_give_no_task():
    codes = np.array([0] * 100 + [1] * 5, np.int32)
    test = np.arange(105) % 3 == 0
    assert make_tasks({"f": (codes, ["common", "rare"])}, test) == []
