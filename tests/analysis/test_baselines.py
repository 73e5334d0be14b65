"""Random baselines score near chance where chance is known; margins are signed so that
positive = trained is better; and through `sae-jax eval`, an SAE trained on synthetic atoms
beats both baselines (eval.json carries the core metrics, `baselines` and `margins`)."""

import json

import numpy as np
import pytest

from sae_jax.analysis import baselines as bl
from sae_jax.analysis.core_metrics import core_metrics
from sae_jax.config import make_config
from sae_jax.data.loader import ArraySpan
from sae_jax.sae import SAE


def trained_like(arch: str, d: int = 32, width: int = 128, k: int = 8, **extra) -> SAE:
    """Stands in for a trained SAE: only its config, width, scale and b_dec matter here."""
    rng = np.random.default_rng(5)
    params = {"W_enc": rng.standard_normal((d, width)).astype(np.float32),
              "b_enc": np.zeros(width, np.float32),
              "W_dec": rng.standard_normal((width, d)).astype(np.float32),
              "b_dec": np.zeros(d, np.float32), **extra}
    cfg = make_config(arch=arch, width=width, k=k, compute_dtype="float32")
    return SAE(cfg, params, 1.0, 1234)


def test_random_directions_sae_is_topk_over_unit_tied_random_directions():
    sae = trained_like("relu", d=16, width=40)
    sae = SAE(sae.config, {**sae.params, "b_dec": np.full(16, 0.25, np.float32)}, 1.7, 9)
    rnd = bl.random_directions_sae(sae, l0=6.4, seed=1)
    assert rnd.config.arch == "topk" and rnd.config.k == 6 and rnd.width == 40
    assert rnd.input_scale == 1.7 and rnd.step == 0
    w = np.asarray(rnd.params["W_dec"])
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(rnd.params["W_enc"]), w.T)
    np.testing.assert_array_equal(np.asarray(rnd.params["b_dec"]), 0.25)
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    assert ((np.asarray(rnd.encode(x)) > 0).sum(1) <= 6).all()
    np.testing.assert_array_equal(bl.random_directions_sae(sae, 6.4, seed=1).params["W_dec"],
                                  w)
    assert bl.random_directions_sae(sae, l0=0.2).config.k == 1  # at least one latent
    assert bl.random_directions_sae(sae, l0=1e6).config.k == 40  # at most the width


def test_random_directions_fvu_is_that_of_random_projections():
    """Isotropic x in d = 256, k = F = 8 random directions (nearly orthogonal): each row keeps
    its positive projections, E relu(N(0,1))² = 1/2 of the variance per direction, so
    FVU ≈ 1 − k/(2d) = 0.984375."""
    d, k = 256, 8
    x = np.random.default_rng(0).standard_normal((4000, d)).astype(np.float32)
    rnd = bl.random_directions_sae(trained_like("topk", d=d, width=k, k=k), l0=k, seed=2)
    res = core_metrics(rnd, ArraySpan(x))
    assert res["fvu"] == pytest.approx(1 - k / (2 * d), abs=0.004)
    assert res["l0"] == pytest.approx(k / 2, rel=0.05)  # relu halves the firing


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk", "batchtopk", "matryoshka"])
def test_random_init_sae_is_the_architectures_fresh_init(arch):
    extra = {"threshold": np.float32(0.7)} if arch in ("batchtopk", "matryoshka") else {}
    if arch == "jumprelu":
        extra = {"log_threshold": np.zeros(512, np.float32)}
    sae = trained_like(arch, d=64, width=512, k=16, **extra)
    fresh = bl.random_init_sae(sae, seed=0)
    assert fresh.config == sae.config and fresh.input_scale == sae.input_scale
    assert set(fresh.params) == set(sae.params)
    w = np.asarray(fresh.params["W_dec"])
    np.testing.assert_allclose(np.asarray(fresh.params["W_enc"]), w.T)  # tied init
    assert not np.allclose(w, np.asarray(sae.params["W_dec"]))
    if arch in ("batchtopk", "matryoshka"):
        # No estimated threshold yet: the one giving L0 ≈ k on isotropic unit-variance data.
        assert float(fresh.params["threshold"]) == pytest.approx(bl.fresh_threshold(16, 512))
        x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
        l0 = (np.asarray(fresh.encode(x)) > 0).sum(1).mean()
        assert l0 == pytest.approx(16, rel=0.1)


def test_margins_are_positive_when_the_trained_sae_is_better():
    trained = {"fvu": 0.1, "explained_variance": 0.9, "fidelity_recovered": 0.8, "l0": 5.0,
               "loss_recovered": None}
    base = {"random_directions": {"fvu": 0.9, "explained_variance": 0.1,
                                  "fidelity_recovered": 0.95, "loss_recovered": 0.3},
            "random_init": {"fvu": float("nan"), "explained_variance": -2.0}}
    hib = {"fvu": False, "explained_variance": True, "fidelity_recovered": True,
           "loss_recovered": True}
    out = bl.margins(trained, base, hib)
    assert out == {"random_directions": {"fvu": pytest.approx(0.8),
                                         "explained_variance": pytest.approx(0.8),
                                         "fidelity_recovered": pytest.approx(-0.15)},
                   "random_init": {"explained_variance": pytest.approx(2.9)}}


def test_eval_command_scores_both_baselines(tmp_path, capsys):
    """`sae-jax eval` from the shell on an SAE trained on known sparse atoms: the new core
    metrics and both baselines are in eval.json, and the trained SAE beats both on FVU."""
    import jax
    from conftest import json_result, sae_jax_cli

    from sae_jax.cli import main
    from sae_jax.data.importers import import_activations
    from sae_jax.data.synthetic import sparse_dictionary_data
    from sae_jax.training.train import train

    x, _ = sparse_dictionary_data(8192, 32, 64, active=3.0, seed=3)
    np.save(tmp_path / "x.npy", x)
    store, run = tmp_path / "store", tmp_path / "run"
    import_activations(tmp_path / "x.npy", store)
    train(make_config(arch="topk", width=128, k=3, steps=200, batch_size=256), store, run,
          progress=False, devices=jax.devices()[:1])
    r = json_result(sae_jax_cli("eval", run, store))
    saved = json.loads((run / "eval" / "eval.json").read_text())
    for key in ("shrinkage", "shrinkage_by_l0", "decoder_sim_mean", "decoder_sim_dup_frac",
                "enc_dec_cos_mean", "enc_dec_cos_median", "l0_p1", "l0_p25", "l0_p75",
                "l0_p99", "baselines", "margins"):
        assert key in saved and saved[key] == r[key], key
    assert 0.5 < r["shrinkage"] < 1.2 and r["fidelity"] is None  # no model for this store
    assert set(r["baselines"]) == set(r["margins"]) == {"random_directions", "random_init"}
    for name, scores in r["baselines"].items():
        assert set(scores) == {"fvu", "explained_variance", "mse", "l0"}, name
        assert r["margins"][name]["fvu"] == pytest.approx(scores["fvu"] - r["fvu"])
        assert r["margins"][name]["fvu"] > 0.2 and r["margins"][name]["explained_variance"] > 0
    assert r["baselines"]["random_directions"]["l0"] <= 3
    capsys.readouterr()
    assert main(["eval", str(run), str(store), "--no-baselines"]) == 0
    r = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert "baselines" not in r and "margins" not in r and "shrinkage" in r
