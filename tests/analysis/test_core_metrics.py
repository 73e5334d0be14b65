"""Core metrics on hand-built SAEs whose answers are known: shrinkage of a reconstruction
scaled by 0.8, decoder similarity of a decoder with a duplicated row, encoder/decoder
alignment of tied and untied SAEs, L0 percentiles of a planted L0 distribution, and the
evals core suite on a store that has no model to measure downstream."""

import numpy as np
import pytest

from sae_jax.analysis import core_metrics as cm
from sae_jax.config import make_config
from sae_jax.data.loader import ArraySpan
from sae_jax.sae import SAE


def scaled_identity_sae(d: int, scale: float, input_scale: float = 1.0) -> SAE:
    """ReLU SAE with features (+e_i, −e_i) and decoder rows scale·(±e_i): x̂ = scale·x, L0 =
    the nonzeros of x, and W_enc = W_decᵀ / scale (directions tied)."""
    eye = np.eye(d, dtype=np.float32)
    params = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d, np.float32),
              "W_dec": scale * np.concatenate([eye, -eye], 0),
              "b_dec": np.zeros(d, np.float32)}
    cfg = make_config(arch="relu", width=2 * d, compute_dtype="float32")
    return SAE(cfg, params, input_scale, 0)


def rows_with_l0(l0s, d: int, seed: int = 0) -> np.ndarray:
    """One row per entry of `l0s`, with exactly that many nonzero (±U(0.5, 2)) entries."""
    rng = np.random.default_rng(seed)
    x = np.zeros((len(l0s), d), np.float32)
    for i, k in enumerate(l0s):
        cols = rng.choice(d, k, replace=False)
        x[i, cols] = rng.choice([-1, 1], k) * rng.uniform(0.5, 2.0, k)
    return x


def test_shrinkage_of_a_reconstruction_scaled_by_0_8_in_every_l0_bucket():
    l0s = [0] * 5 + [1] * 10 + [2] * 10 + [3] * 10 + [5] * 40 + [12] * 30
    x = rows_with_l0(l0s, d=16)
    res = cm.core_metrics(scaled_identity_sae(16, 0.8, input_scale=2.5), ArraySpan(x),
                          batch_size=32)
    assert res["shrinkage"] == pytest.approx(0.8, rel=1e-5)  # all-zero rows left out
    by = cm.shrinkage_by_l0(cm.eval_sums(scaled_identity_sae(16, 0.8), ArraySpan(x))[
        "norm_ratio"], np.asarray(l0s))
    assert by["l0_min"] == [1, 2, 4, 8] and by["l0_max"] == [1, 3, 7, 15]
    assert by["rows"] == [10, 20, 40, 30]
    np.testing.assert_allclose(by["shrinkage"], 0.8, rtol=1e-5)
    # A reconstruction that is x itself has no shrinkage.
    assert cm.core_metrics(scaled_identity_sae(16, 1.0), ArraySpan(x))["shrinkage"] == (
        pytest.approx(1.0, rel=1e-6))


def test_l0_buckets_are_powers_of_two():
    np.testing.assert_array_equal(cm.l0_buckets([0, 1, 2, 3, 4, 7, 8, 1023, 1024]),
                                  [0, 1, 2, 2, 3, 3, 4, 10, 11])


def test_l0_percentiles_of_a_planted_distribution():
    l0s = np.repeat(np.arange(1, 11), 10)  # L0 1..10, ten rows each
    res = cm.core_metrics(scaled_identity_sae(16, 1.0), ArraySpan(rows_with_l0(l0s, 16)))
    # Linear interpolation between order statistics: p at rank 99·q/100 of the sorted L0s.
    want = {1: 1.0, 10: 1.9, 25: 3.0, 50: 5.5, 75: 8.0, 90: 9.1, 99: 10.0}
    for q, value in want.items():
        assert res[f"l0_p{q}"] == pytest.approx(value), q
    assert res["l0"] == pytest.approx(5.5)
    # Feature health comes from the same pass: e_i and −e_i each fire on some rows.
    assert res["dead_frac"] == 0.0 and 0.0 < res["dense_frac"] <= 1.0


def with_decoder(w_dec: np.ndarray, w_enc: np.ndarray | None = None) -> SAE:
    width, d = w_dec.shape
    params = {"W_enc": (w_dec.T if w_enc is None else w_enc).astype(np.float32),
              "b_enc": np.zeros(width, np.float32), "W_dec": w_dec.astype(np.float32),
              "b_dec": np.zeros(d, np.float32)}
    return SAE(make_config(arch="relu", width=width, compute_dtype="float32"), params, 1.0, 0)


def test_decoder_similarity_of_a_decoder_with_a_duplicated_row():
    eye = np.eye(8)
    w_dec = np.stack([eye[0], 3.0 * eye[0],                 # a duplicate (norms differ)
                      eye[1], eye[2],                       # alone
                      (eye[3] + eye[4]) / np.sqrt(2), eye[3],  # cosine 1/√2
                      0.95 * eye[5] + np.sqrt(1 - 0.95 ** 2) * eye[6], eye[5]])  # 0.95
    sim = cm.max_other_cosine(w_dec)
    np.testing.assert_allclose(sim, [1, 1, 0, 0, 2 ** -0.5, 2 ** -0.5, 0.95, 0.95], atol=1e-6)
    res = cm.weight_metrics(with_decoder(w_dec))
    assert res["decoder_sim_mean"] == pytest.approx((2 + 2 ** 0.5 + 1.9) / 8, abs=1e-6)
    # cos ≥ DUPLICATE_COSINE (0.9, prune's default): the exact pair and the 0.95 pair.
    assert cm.DUPLICATE_COSINE == 0.9
    assert res["decoder_sim_dup_frac"] == pytest.approx(4 / 8)


def test_prune_uses_the_same_duplicate_threshold():
    import argparse

    from sae_jax.release import prune

    parser = argparse.ArgumentParser()
    prune.add_arguments(parser)
    assert parser.parse_args(["R", "O"]).duplicate_cosine == cm.DUPLICATE_COSINE


def test_encoder_decoder_alignment():
    rng = np.random.default_rng(0)
    w_dec = rng.standard_normal((12, 6))
    tied = cm.weight_metrics(with_decoder(w_dec, 0.3 * w_dec.T))  # norms do not matter
    assert tied["enc_dec_cos_mean"] == pytest.approx(1.0)
    assert tied["enc_dec_cos_median"] == pytest.approx(1.0)
    # Half the encoder columns flipped: cosines 1 and −1, mean 0; then 3 of 4 flipped.
    flip = np.where(np.arange(12) % 2 == 0, 1.0, -1.0)
    half = cm.weight_metrics(with_decoder(w_dec, w_dec.T * flip))
    assert half["enc_dec_cos_mean"] == pytest.approx(0.0, abs=1e-9)
    flip3 = np.where(np.arange(12) % 4 == 0, 1.0, -1.0)
    most = cm.weight_metrics(with_decoder(w_dec, w_dec.T * flip3))
    assert most["enc_dec_cos_mean"] == pytest.approx(-0.5)
    assert most["enc_dec_cos_median"] == pytest.approx(-1.0)


def test_transcoder_has_no_alignment_and_shrinkage_is_of_the_target():
    from sae_jax.data.synthetic import sparse_transcoder_data

    x, y, *_ = sparse_transcoder_data(500, 6, 4, 8, seed=1)
    d_in, d_out, width = 6, 4, 16
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.standard_normal((d_in, width)).astype(np.float32),
              "b_enc": np.zeros(width, np.float32),
              "W_dec": rng.standard_normal((width, d_out)).astype(np.float32),
              "b_dec": np.zeros(d_out, np.float32)}
    cfg = make_config(arch="relu", width=width, transcoder=True, compute_dtype="float32")
    sae = SAE(cfg, params, 1.0, 0, target_scale=1.0)
    res = cm.core_metrics(sae, ArraySpan(np.concatenate([x, y], 1)))
    assert res["enc_dec_cos_mean"] is None and res["enc_dec_cos_median"] is None
    want = np.linalg.norm(np.asarray(sae(x)), axis=1) / np.linalg.norm(y, axis=1)
    assert res["shrinkage"] == pytest.approx(float(want[np.isfinite(want)].mean()), rel=1e-4)


def test_core_suite_without_a_model_to_measure_downstream(tmp_path, capsys):
    """A plain imported store: the suite's metrics are core_metrics's on the held-out tail,
    and the downstream number is None with one warning line."""
    from types import SimpleNamespace

    from sae_jax.data.importers import import_activations

    x = rows_with_l0(np.tile([1, 2, 3, 4], 50), d=8)
    np.save(tmp_path / "x.npy", x)
    store = import_activations(tmp_path / "x.npy", tmp_path / "store")
    sae = scaled_identity_sae(8, 0.8)
    out = cm.suite(sae, store, SimpleNamespace(split="heldout"))
    heldout = store.split(sae.config.holdout)[1]
    want = cm.core_metrics(sae, heldout)
    assert out["metrics"]["fidelity_recovered"] is None
    assert "fidelity skipped" in capsys.readouterr().err
    for key, value in want.items():
        if key != "n_rows":
            assert out["metrics"][key] == pytest.approx(value, nan_ok=True), key
    assert out["higher_is_better"] == {"fvu": False, "explained_variance": True, "mse": False,
                                       "fidelity_recovered": True}
    assert out["detail"]["n_rows"] == len(heldout)
    assert out["detail"]["shrinkage_by_l0"]["shrinkage"] == pytest.approx([0.8] * 3)


def test_decoder_init_cosine_measures_how_far_training_moved_the_dictionary(tmp_path):
    import dataclasses

    import jax

    from sae_jax import saes

    cfg = make_config(arch="topk", width=64, k=4, seed=3)
    init = saes.init(jax.random.key(3), cfg, 16)
    untrained = SAE(cfg, dict(init), 1.0, 0)
    assert cm.decoder_init_cosine(untrained, tmp_path) == pytest.approx(1.0)
    # half of the rows replaced by unrelated directions: the mean drops to ~0.5
    w = np.array(init["W_dec"])
    w[::2] = np.random.default_rng(0).standard_normal((32, 16))
    moved = dataclasses.replace(untrained, params={**init, "W_dec": w})
    assert 0.35 < cm.decoder_init_cosine(moved, tmp_path) < 0.65
    # another seed's init is not this run's
    other = dataclasses.replace(untrained, config=dataclasses.replace(cfg, seed=4))
    assert abs(cm.decoder_init_cosine(other, tmp_path)) < 0.2
    # an imported run has no init of ours
    (tmp_path / "imported_from.json").write_text("{}")
    assert cm.decoder_init_cosine(untrained, tmp_path) is None
