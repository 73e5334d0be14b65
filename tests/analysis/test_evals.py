"""`sae-jax evals`: Student-t intervals against hand values, PW-MCC of identical runs, and the
command on a tiny seed sweep (JSON with per-seed values and CIs, PNGs, the dashboard's
Evals table rendered by headless Chromium)."""

import importlib.util
import json
import math
import re
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import json_result, one_error_line, sae_jax_cli

from sae_jax.analysis import evals, evals_interim, seed_stats
from sae_jax.config import make_config
from sae_jax.errors import UserError
from sae_jax.training.grid import expand_grid, run_names
from sae_jax.training.sweep import train_sweep


def test_t_quantiles_match_the_table():
    # Student t, two-sided 95 % (p = 0.975): standard table values
    for dof, t in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert seed_stats.t_quantile(0.975, dof) == pytest.approx(t, abs=1e-4)
    assert seed_stats.t_quantile(0.975, 10**6) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError):
        seed_stats.t_quantile(0.975, 0)


def test_mean_ci_against_a_hand_value():
    # 1, 2, 3: mean 2, s = 1, half-width = t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    ci = seed_stats.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["std"] == pytest.approx(1.0) and ci["n"] == 3
    assert ci["half_width"] == pytest.approx(2.484138, abs=1e-6)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((2 - 2.484138, 2 + 2.484138))
    assert seed_stats.mean_ci([1.0, None, 3.0, math.nan])["n"] == 2  # nulls are not runs
    one = seed_stats.mean_ci([0.5])
    assert one["mean"] == 0.5 and one["ci_low"] is None and one["half_width"] is None
    assert "no confidence interval" in one["note"]
    assert seed_stats.mean_ci([])["mean"] is None


def test_pw_mcc_of_identical_runs_is_one():
    w = np.random.default_rng(0).standard_normal((48, 16)).astype(np.float32)
    # the same dictionary, features reordered and rescaled, is the same dictionary
    same = w[np.random.default_rng(1).permutation(48)] * 3.0
    mcc = seed_stats.pw_mcc([w, same, w], ["a", "b", "c"])
    assert [(p["a"], p["b"]) for p in mcc["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert mcc["mean"] == pytest.approx(1.0, abs=1e-5) and mcc["n"] == 3
    other = np.random.default_rng(2).standard_normal((48, 16))
    assert seed_stats.pw_mcc([w, other], ["a", "b"])["mean"] < 0.7
    assert "at least two runs" in seed_stats.pw_mcc([w], ["a"])["note"]


def test_margins_are_positive_when_the_trained_sae_is_better():
    m = evals_interim.margins({"fvu": 0.2, "explained_variance": 0.8, "l0": 5.0},
                              {"random": {"fvu": 0.9, "explained_variance": 0.1, "l0": 5.0}},
                              {"fvu": False, "explained_variance": True})
    assert m == {"random": pytest.approx({"fvu": 0.7, "explained_variance": 0.7})}


@pytest.fixture(scope="module")
def seed_sweep(synthetic_store, tmp_path_factory):
    """Three seeds of a tiny TopK SAE on the synthetic store, one pass on one device."""
    grid = expand_grid(["width=32", "k=3", "steps=20", "batch_size=128", "log_every=10",
                        "ckpt_every=20", "seed=0,1,2"])
    run_dir = tmp_path_factory.mktemp("evals") / "seeds"
    train_sweep([make_config(p) for p in grid], synthetic_store, run_dir, progress=False,
                names=run_names(grid), devices=jax.devices()[:1])
    return run_dir


def test_evals_entry_point_on_a_seed_sweep(seed_sweep, synthetic_store, tmp_path):
    """`sae-jax evals SWEEP DATA --suite core` (progress bar on, 8 devices): per-seed values,
    mean ± CI, both baselines with margins, PW-MCC over the 3 pairs, PNG, dashboard table."""
    proc = sae_jax_cli("evals", seed_sweep, synthetic_store, "--suite", "core")
    result = json_result(proc)
    assert "evals: 100%" in proc.stderr  # the progress bar ran
    out = seed_sweep / "evals"
    assert result["out"] == str(out) and result["n_runs"] == 3
    report = json.loads((out / "evals.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["seed=0", "seed=1", "seed=2"]
    assert [(r["seed"], r["data_seed"]) for r in report["runs"]] == [(0, 0), (1, 0), (2, 0)]
    fvu = report["metrics"]["fvu"]
    assert len(fvu["per_run"]) == 3 and fvu["n"] == 3 and fvu["higher_is_better"] is False
    assert fvu["mean"] == pytest.approx(np.mean(fvu["per_run"]))
    half = seed_stats.t_quantile(0.975, 2) * np.std(fvu["per_run"], ddof=1) / math.sqrt(3)
    assert fvu["half_width"] == pytest.approx(half)
    assert result["metrics"]["fvu"]["ci_low"] == pytest.approx(fvu["mean"] - half)
    for base in ("random_directions", "random_init"):
        b = fvu["baselines"][base]
        assert len(b["per_run"]) == 3 and b["mean"] > fvu["mean"]  # trained beats random
        assert fvu["margins"][base]["per_run"] == pytest.approx(
            [x - y for x, y in zip(b["per_run"], fvu["per_run"])])
    assert report["metrics"]["l0"]["baselines"]["random_directions"]["mean"] == 3.0
    mcc = report["pw_mcc"]
    assert len(mcc["pairs"]) == 3 and 0 < mcc["mean"] < 1 and mcc["ci_low"] is not None
    png = out / "evals_core.png"
    assert result["pngs"] == [str(png)] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _dashboard_shows_the_evals(seed_sweep / "seed=1", synthetic_store, tmp_path, report)


def _dashboard_shows_the_evals(member: Path, store, tmp_path: Path, report: dict):
    """A member's dashboard finds its sweep's evals and renders the table in Chromium."""
    from test_dashboard import _chromium

    from sae_jax.analysis.dashboard import write_dashboard

    assert evals.read_evals(member)["runs"] == report["runs"]
    site = write_dashboard(member, store, tmp_path / "site", features=8)
    assert site["evals"] is True
    text = (tmp_path / "site" / "evals.js").read_text()
    shown = json.loads(text[len("window.SAE_EVALS = "):].rstrip().rstrip(";"))
    assert shown["metrics"] == report["metrics"] and "detail" not in shown
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          "--virtual-time-budget=5000", (tmp_path / "site/index.html").as_uri()],
                         capture_output=True, text=True, timeout=60).stdout
    assert 'data-ready="1"' in dom and '<section id="evals">' in dom
    assert re.search(r'<tr data-metric="fvu"><td>fvu ↓</td><td>core</td><td class="num">'
                     r'[0-9.]+ ± [0-9.e-]+</td>', dom)
    assert '<tr data-metric="pw_mcc">' in dom


def test_evals_refuses_what_does_not_compare(seed_sweep, synthetic_store, tmp_path):
    one = seed_sweep / "seed=0"
    assert "several RUNs need --out" in one_error_line(
        sae_jax_cli("evals", one, seed_sweep / "seed=1", synthetic_store, "--quiet"))
    other = tmp_path / "wide"
    train_sweep([make_config(["width=64", "k=3", "steps=2", "batch_size=128"])],
                synthetic_store, other, progress=False, names=["w64"],
                devices=jax.devices()[:1])
    with pytest.raises(UserError, match="runs seed=0 and w64 differ in width .32 vs 64."):
        evals.check_comparable(*_runs_and_infos([one, other / "w64"]))
    with pytest.raises(UserError, match="neither a run .config.json. nor a sweep"):
        evals.expand_runs([str(tmp_path)])
    if importlib.util.find_spec(evals.SUITE_MODULES["probing"]) is None:  # not merged yet
        with pytest.raises(UserError, match="the probing suite is not available"):
            evals.load_suite("probing")
    else:
        assert callable(evals.load_suite("probing"))


def _runs_and_infos(paths):
    from sae_jax.rundir import read_run

    runs = evals.expand_runs([str(p) for p in paths])
    return runs, [read_run(d) for _, d in runs]
