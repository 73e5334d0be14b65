"""Scaling-law fits recover planted laws; files and plots round-trip (pure numpy, fast)."""

import json

import numpy as np
import pytest

from sae_jax.errors import UserError
from sae_jax.planning import scaling

TRUE = {"L_inf": 0.05, "a": 40.0, "alpha": 0.15}
D_IN, BATCH = 64, 256
WIDTH_EXP, STEPS_EXP = 0.5, 0.3  # loss = L_inf + A·F^-0.5 + B·S^-0.3


def power_law_loss(compute, noise=0.0, seed=0):
    clean = TRUE["L_inf"] + TRUE["a"] * np.asarray(compute) ** -TRUE["alpha"]
    return clean * np.exp(np.random.default_rng(seed).normal(0, noise, np.shape(compute)))


def grid_points(lo=6, hi=16):
    """A width × steps grid, factor 2 on both axes, whose loss has a known optimum at each
    compute: with C ∝ F·S, F*(C) ∝ C^(q/(p+q)) = C^0.375 and S*(C) ∝ C^0.625."""
    points = []
    for width in 2 ** np.arange(lo, hi + 1):
        for steps in 2 ** np.arange(lo, hi + 1):
            loss = 0.02 + 3.0 * width ** -WIDTH_EXP + 2.0 * steps ** -STEPS_EXP
            points.append({"width": int(width), "steps": int(steps),
                           "tokens": int(steps * BATCH),
                           "flops": float(10 * D_IN * width * steps * BATCH),
                           "loss": float(loss), "d_in": D_IN})
    return points


def on_law_points(n=10):
    """Points exactly on L(C), several widths per compute (only the best is on the law)."""
    compute = np.logspace(13, 19, n)
    points = []
    for i, c in enumerate(compute):
        for j, excess in enumerate((1.0, 1.3)):
            points.append({"width": 2 ** (8 + i // 2 + j), "steps": 1000 * (i + 1),
                           "tokens": 1000 * (i + 1) * BATCH, "flops": float(c),
                           "loss": float(power_law_loss(c) * excess)})
    return points


def test_power_law_recovers_planted_parameters_within_3_sigma():
    compute = np.logspace(12, 18, 16)
    fit = scaling.fit_power_law(compute, power_law_loss(compute, noise=0.02))
    for key, true in TRUE.items():
        assert fit[f"{key}_err"] is not None and fit[f"{key}_err"] > 0
        assert abs(fit[key] - true) <= 3 * fit[f"{key}_err"], (key, fit)
    # stated tolerance at 2% noise over 6 decades
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], rel=0.1)
    assert fit["a"] == pytest.approx(TRUE["a"], rel=0.3)
    assert fit["L_inf"] == pytest.approx(TRUE["L_inf"], abs=0.02)
    assert fit["r2"] > 0.99 and fit["n_points"] == 16


def test_power_law_errors_are_calibrated():
    """Over 60 noisy draws the true alpha lies within 2σ about 95% of the time."""
    compute = np.logspace(12, 18, 12)
    z = []
    for seed in range(60):
        fit = scaling.fit_power_law(compute, power_law_loss(compute, 0.02, seed))
        z.append((fit["alpha"] - TRUE["alpha"]) / fit["alpha_err"])
    assert 0.85 <= np.mean(np.abs(z) < 2) <= 1.0
    assert np.mean(np.abs(z) < 1) >= 0.5


def test_power_law_is_exact_without_noise_and_predicts():
    compute = np.logspace(10, 16, 8)
    fit = scaling.fit_power_law(compute, power_law_loss(compute))
    for key, true in TRUE.items():
        assert fit[key] == pytest.approx(true, rel=1e-4)
    assert scaling.predict(fit, 1e20) == pytest.approx(float(power_law_loss(1e20)), rel=1e-4)
    assert scaling.predict(fit, compute).shape == compute.shape


def test_power_law_with_three_points_has_no_errors_and_bad_input_fails():
    fit = scaling.fit_power_law([1e12, 1e13, 1e14], power_law_loss([1e12, 1e13, 1e14]))
    assert fit["alpha_err"] is None and fit["a_err"] is None
    with pytest.raises(UserError, match="3 distinct"):
        scaling.fit_power_law([1e12, 1e12, 1e13], [1.0, 0.9, 0.8])
    with pytest.raises(UserError, match="positive"):
        scaling.fit_power_law([1e12, -1.0, 1e13], [1.0, 0.9, 0.8])


def test_pure_power_law_recovers_exponent():
    x = np.logspace(14, 20, 9)
    rng = np.random.default_rng(1)
    y = 3e-4 * x**0.4 * np.exp(rng.normal(0, 0.03, x.size))
    fit = scaling.fit_pure_power_law(x, y)
    assert abs(fit["exponent"] - 0.4) <= 3 * fit["exponent_err"]
    assert abs(fit["coef"] - 3e-4) <= 3 * fit["coef_err"]
    exact = scaling.fit_pure_power_law(x, 3e-4 * x**0.4)
    assert exact["exponent"] == pytest.approx(0.4, rel=1e-9)
    assert exact["coef"] == pytest.approx(3e-4, rel=1e-6) and exact["r2"] == pytest.approx(1)
    assert scaling.fit_pure_power_law([1, 10], [2, 20])["exponent_err"] is None


def test_loss_frontier_keeps_points_no_cheaper_run_beats():
    pts = [{"width": 1, "steps": 1, "tokens": 1, "flops": c, "loss": loss}
           for c, loss in ((1, 5.0), (2, 6.0), (2, 4.0), (3, 4.0), (4, 3.0), (4, 3.5))]
    frontier = scaling.loss_frontier(pts)
    assert [(p["flops"], p["loss"]) for p in frontier] == [(1, 5.0), (2, 4.0), (4, 3.0)]


def test_iso_compute_recovers_planted_optimal_width_and_steps():
    result = scaling.fit_scaling(grid_points())
    q_over = STEPS_EXP / (WIDTH_EXP + STEPS_EXP)
    width, steps = result["optimal_width"], result["optimal_steps"]
    assert width["exponent"] == pytest.approx(q_over, abs=0.01)
    assert steps["exponent"] == pytest.approx(1 - q_over, abs=0.01)
    assert width["r2"] > 0.999 and width["n_points"] >= 10
    groups = result["iso_compute"]
    assert not groups[0]["interior"] and not groups[-1]["interior"]  # grid corners
    # The parabola finds the planted optimum between grid points (within 3%, where the
    # grid's argmin alone is up to 41% off): F* solves p·A·F^-p = q·B·S^-q with F·S fixed.
    a, b = 3.0 * WIDTH_EXP, 2.0 * STEPS_EXP
    for g in (g for g in groups if g["interior"]):
        fs = g["flops"] / (10 * D_IN * BATCH)  # F·S on this diagonal
        planted = (a / b * fs**STEPS_EXP) ** (1 / (WIDTH_EXP + STEPS_EXP))
        assert g["width"] == pytest.approx(planted, rel=0.03)
        assert g["steps"] == pytest.approx(fs / planted, rel=0.03)
    assert result["d_in"] == D_IN and result["tokens_per_step"] == BATCH


def test_heldout_prediction_is_close_on_noise_free_law():
    points = on_law_points()
    result = scaling.fit_scaling(points)
    assert result["heldout_rel_error"] < 1e-3
    assert result["heldout"]["flops"] == max(p["flops"] for p in points)
    roles = [p["role"] for p in result["points"]]
    assert roles.count("heldout") == 1 and roles.count("fit") == 9
    assert roles.count("off_frontier") == 10
    assert result["loss_vs_compute"]["n_points"] == 9
    assert scaling.fit_scaling(points, holdout_largest=False)["heldout"] is None


def test_fit_scaling_rejects_too_few_or_bad_points():
    with pytest.raises(UserError, match="frontier"):
        scaling.fit_scaling(on_law_points(3))
    with pytest.raises(UserError, match="lacks loss"):
        scaling.fit_scaling([{"width": 1, "steps": 1, "tokens": 1, "flops": 1.0}])
    with pytest.raises(UserError, match="positive"):
        scaling.fit_scaling([{"width": 1, "steps": 1, "tokens": 1, "flops": 1.0,
                              "loss": float("nan")}])


def test_write_and_read_fit_round_trip(tmp_path):
    result = scaling.fit_scaling(grid_points(6, 12))
    path = scaling.write_fit(result, tmp_path / "fit")
    assert json.loads((tmp_path / "fit" / scaling.FIT_FILE).read_text()) == result
    assert scaling.read_fit(path) == result
    assert scaling.read_fit(tmp_path / "fit") == result  # the directory works too


@pytest.mark.parametrize("text, message", [
    (None, "no scaling fit"),
    ('{"kind": "sae_jax.scaling_fit", "version": 1, "loss_vs', "not valid JSON"),
    ('{"loss_vs_compute": {}}', "not a scaling fit"),
    ('{"kind": "sae_jax.scaling_fit", "version": 9}', "version 9"),
    ('{"kind": "sae_jax.scaling_fit", "version": 1}', "no loss_vs_compute"),
    ('{"kind": "sae_jax.scaling_fit", "version": 1, "loss_vs_compute": '
     '{"L_inf": 0.1, "a": "x", "alpha": 0.2}}', "finite numbers"),
    ('{"kind": "sae_jax.scaling_fit", "version": 1, "loss_vs_compute": '
     '{"L_inf": 0.1, "a": 1, "alpha": 0.2}, "optimal_width": {"coef": 1}}', "optimal_width"),
])
def test_read_fit_rejects_missing_or_damaged_files(tmp_path, text, message):
    path = tmp_path / "fit.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=message):
        scaling.read_fit(path)


def test_plots_are_png():
    points = grid_points(6, 12)
    result = scaling.fit_scaling(points)
    for png in (scaling.plot_loss_vs_compute(points, result), scaling.plot_optimal(result),
                scaling.plot_loss_vs_compute(points, result["loss_vs_compute"])):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
