"""Drift between SAEs: self and permuted copies match exactly, hand-built splits and merges
are found, streaming correlations equal a dense computation, and the CLI writes its files."""

import argparse
import json

import jax
import numpy as np
import pytest
from conftest import json_result, one_error_line, sae_jax_cli

from sae_jax import saes
from sae_jax.analysis import compare, matching
from sae_jax.analysis.correlation import activation_correlation
from sae_jax.config import make_config
from sae_jax.data.loader import ArraySpan
from sae_jax.errors import UserError
from sae_jax.sae import SAE

D = 24


def relu_sae(w_dec: np.ndarray, w_enc: np.ndarray | None = None, b_enc=None) -> SAE:
    """A ReLU SAE with the given decoder (and encoder; default: decoder transposed)."""
    f = len(w_dec)
    cfg = make_config(arch="relu", width=f, compute_dtype="float32")
    params = saes.init(jax.random.key(0), cfg, w_dec.shape[1])
    params = {**params, "W_dec": np.asarray(w_dec, np.float32),
              "W_enc": np.asarray(w_dec.T if w_enc is None else w_enc, np.float32),
              "b_enc": np.asarray(np.full(f, -0.5) if b_enc is None else b_enc, np.float32)}
    return SAE(cfg, params, 1.3, 0)


def permuted_copy(sae: SAE, perm: np.ndarray, scale: np.ndarray) -> SAE:
    """Feature j of the copy is feature perm[j] of `sae`, firing `scale[j]` times as strongly
    with a decoder row `1 / scale[j]` as long: the same SAE, relabelled and rescaled."""
    p = sae.params
    params = {**p, "W_enc": np.asarray(p["W_enc"])[:, perm] * scale,
              "b_enc": np.asarray(p["b_enc"])[perm] * scale,
              "W_dec": np.asarray(p["W_dec"])[perm] / scale[:, None]}
    return SAE(sae.config, params, sae.input_scale, 0)


@pytest.fixture(scope="module")
def random_sae():
    rng = np.random.default_rng(0)
    return relu_sae(rng.standard_normal((40, D)).astype(np.float32) / np.sqrt(D))


@pytest.fixture(scope="module")
def rows():
    return ArraySpan(np.random.default_rng(1).standard_normal((700, D)).astype(np.float32))


def test_self_is_a_perfect_match(random_sae, rows):
    res = compare.compare_saes(random_sae, random_sae, rows, batch_size=256)
    a = res["per_feature"]["a"]
    assert np.array_equal(a["partner"], np.arange(40))
    np.testing.assert_allclose(a["cosine"], 1.0, atol=1e-6)
    assert res["n_matched"] == 40 and res["matched_frac_a"] == res["matched_frac_b"] == 1.0
    assert res["counts"]["matched_a"] == 40 and res["counts"]["vanished_a"] == 0
    assert all(v == {"a": 1.0, "b": 1.0} for v in res["matched_frac_at"].values())
    assert np.all(a["frequency"] > 0)  # every feature fires, so every correlation is defined
    np.testing.assert_allclose(a["corr"], 1.0, atol=1e-5)
    assert np.array_equal(a["best_corr_partner"], np.arange(40))
    assert res["activation"]["corr_matched_mean"] == pytest.approx(1.0, abs=1e-5)
    assert res["examples"] == {"vanished": [], "split": [], "appeared": [], "merged": []}


@pytest.mark.parametrize("dense_max_entries", [matching.DENSE_MAX_ENTRIES, 0])
def test_permuted_rescaled_copy_is_recovered(random_sae, rows, dense_max_entries):
    rng = np.random.default_rng(2)
    perm = rng.permutation(40)
    scale = rng.uniform(0.3, 3.0, 40).astype(np.float32)
    res = compare.compare_saes(random_sae, permuted_copy(random_sae, perm, scale), rows,
                               dense_max_entries=dense_max_entries, batch_size=300)
    assert res["assignment"] == ("exact" if dense_max_entries else "candidates")
    a, b = res["per_feature"]["a"], res["per_feature"]["b"]
    assert np.array_equal(b["partner"], perm)  # B's feature j is A's feature perm[j]
    assert np.array_equal(a["partner"][perm], np.arange(40))
    np.testing.assert_allclose(a["cosine"], 1.0, atol=1e-5)
    # ReLU commutes with a positive scale: the activations are perfectly correlated.
    np.testing.assert_allclose(a["corr"], 1.0, atol=1e-5)
    if dense_max_entries:
        assert np.array_equal(a["best_corr_partner"], a["partner"])


def orthonormal(n: int, seed: int = 3) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((64, n)))
    return q.T.astype(np.float32)  # (n, 64) orthonormal rows


def test_split_merge_vanish_appear():
    """A: e0 = (q20 + q21 + q22)/√3, e1..e9 = q1..q9, q23, q24, q30.
    B: q1..q9, q20, q21, q22 (e0 split three ways), (q23 + q24)/√2 (A's two merged), q31."""
    q = orthonormal(32)
    a = np.stack([(q[20] + q[21] + q[22]) / np.sqrt(3), *q[1:10], q[23], q[24], q[30]])
    b = np.stack([*q[1:10], q[20], q[21], q[22], (q[23] + q[24]) / np.sqrt(2), q[31]])
    res = matching.match_features(a * 3.0, b, threshold=0.75)  # row scales do not matter
    assert (res["width_a"], res["width_b"], res["n_matched"]) == (13, 14, 9)
    cat_a, cat_b = res["per_feature"]["a"]["category"], res["per_feature"]["b"]["category"]
    assert cat_a.tolist() == ["split", *["matched"] * 9, "merge_part", "merge_part", "vanished"]
    assert cat_b.tolist() == [*["matched"] * 9, *["split_part"] * 3, "merged", "appeared"]
    split = res["splits"][0]
    assert split["fit_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert sorted(p[0] for p in split["parts"]) == [9, 10, 11]
    np.testing.assert_allclose([p[1] for p in split["parts"]], 1 / np.sqrt(3), atol=1e-5)
    assert sorted(p[0] for p in res["merges"][12]["parts"]) == [10, 11]
    assert res["counts"] == {"matched_a": 9, "split_a": 1, "merge_part_a": 2, "vanished_a": 1,
                             "redundant_a": 0, "matched_b": 9, "merged_b": 1,
                             "split_part_b": 3, "appeared_b": 1, "redundant_b": 0}
    # At threshold 0.7 the even two-way merge (cos 1/√2 = 0.707) is a one-to-one match.
    loose = matching.match_features(a, b, threshold=0.7)
    assert loose["n_matched"] == 10 and loose["counts"]["merged_b"] == 0


def test_examples_carry_catalog_labels():
    q = orthonormal(32)
    a = np.stack([(q[20] + q[21] + q[22]) / np.sqrt(3), *q[1:10], q[30]])
    b = np.stack([*q[1:10], q[20], q[21], q[22], q[31]])
    catalog_a = {0: {"label": "parent", "top_tokens": ["def"]},
                 10: {"label": "gone", "top_tokens": ["x"]}}
    catalog_b = {9: {"label": "child", "top_tokens": ["class"]}}
    res = compare.compare_saes(relu_sae(a), relu_sae(b), catalog_a=catalog_a,
                               catalog_b=catalog_b)
    ex = res["examples"]
    assert [e["id"] for e in ex["vanished"]] == [10] and ex["vanished"][0]["label"] == "gone"
    assert [e["id"] for e in ex["appeared"]] == [12] and "label" not in ex["appeared"][0]
    (split,) = ex["split"]
    assert split["id"] == 0 and split["label"] == "parent"
    parts = {p["id"]: p for p in split["parts"]}
    assert set(parts) == {9, 10, 11} and parts[9]["label"] == "child"
    assert parts[9]["coef"] == pytest.approx(1 / np.sqrt(3), abs=1e-5)
    assert parts[9]["cosine_to_whole"] == pytest.approx(1 / np.sqrt(3), abs=1e-5)
    assert res["activation"] is None
    json.dumps(compare.summary(res), allow_nan=False)


@pytest.mark.parametrize("dense_max_entries", [matching.DENSE_MAX_ENTRIES, 0])
def test_different_widths(dense_max_entries):
    """B holds A's 30 features (shuffled) plus 20 new ones; and the other way round."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((30, 64)).astype(np.float32)
    perm = rng.permutation(50)
    b = np.concatenate([a, rng.standard_normal((20, 64)).astype(np.float32)])[perm]
    res = matching.match_features(a, b, dense_max_entries=dense_max_entries)
    assert res["n_pairs"] == 30 and res["n_matched"] == 30
    assert res["matched_frac_a"] == 1.0 and res["matched_frac_b"] == pytest.approx(0.6)
    assert np.array_equal(perm[res["per_feature"]["a"]["partner"]], np.arange(30))
    assert res["counts"]["appeared_b"] == 20 and res["counts"]["vanished_a"] == 0
    back = matching.match_features(b, a, dense_max_entries=dense_max_entries)
    assert back["n_matched"] == 30 and back["counts"]["vanished_a"] == 20
    assert np.array_equal(perm[back["per_feature"]["b"]["partner"]], np.arange(30))


def test_mismatched_d_in_is_a_user_error(random_sae):
    other = relu_sae(np.ones((8, D + 1), np.float32))
    with pytest.raises(UserError, match="d_in 24 vs 25"):
        compare.compare_saes(random_sae, other)
    with pytest.raises(UserError, match="d_in"):
        activation_correlation(random_sae, random_sae,
                                       ArraySpan(np.zeros((10, D + 1), np.float32)),
                                       np.arange(40))
    with pytest.raises(UserError, match="threshold"):
        matching.match_features(np.ones((3, 4)), np.ones((3, 4)), threshold=1.5)


def test_streaming_correlation_equals_dense(rows):
    rng = np.random.default_rng(5)
    sae_a = relu_sae(rng.standard_normal((12, D)).astype(np.float32),
                     b_enc=rng.uniform(-2, 0.5, 12))
    sae_b = relu_sae(rng.standard_normal((9, D)).astype(np.float32),
                     b_enc=np.r_[rng.uniform(-2, 0.5, 8), -1e9])  # B's last never fires
    partner = np.r_[rng.permutation(9), [-1, -1, -1]]
    fa = np.asarray(sae_a.encode(rows.array), np.float64)
    fb = np.asarray(sae_b.encode(rows.array), np.float64)
    with np.errstate(invalid="ignore"):
        dense = np.corrcoef(fa.T, fb.T)[:12, 12:]
    want = np.array([dense[i, p] if p >= 0 else np.nan for i, p in enumerate(partner)])
    for batch_size in (64, 1000):
        got = activation_correlation(sae_a, sae_b, rows, partner, batch_size=batch_size)
        np.testing.assert_allclose(got["corr_a"], want, atol=1e-5)  # NaN where undefined
        best = np.where(np.isfinite(dense), dense, -np.inf)
        np.testing.assert_allclose(got["best_corr_a"], best.max(1), atol=1e-5)
        assert np.array_equal(got["best_corr_partner_a"], best.argmax(1))
        assert got["best_corr_partner_b"][8] == -1 and np.isnan(got["best_corr_b"][8])
        np.testing.assert_allclose(got["frequency_b"], (fb > 0).mean(0))
    got = activation_correlation(sae_a, sae_b, rows, partner, max_rows=100)
    assert got["n_rows"] == 100


# ---------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def two_runs(synthetic_store, tmp_path_factory):
    """Two tiny TopK runs on the synthetic atoms that differ only in their seed."""
    from sae_jax.training.train import train

    tmp = tmp_path_factory.mktemp("compare_runs")
    for seed in (0, 1):
        cfg = make_config(arch="topk", width=64, k=3, steps=300, batch_size=256,
                          log_every=300, seed=seed)
        train(cfg, synthetic_store, tmp / f"seed{seed}", progress=False,
              devices=jax.devices()[:1])
    return tmp / "seed0", tmp / "seed1"


def parse(argv):
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_cli_on_two_seeds(two_runs, synthetic_store, tmp_path):
    run_a, run_b = two_runs
    done = sae_jax_cli("compare", run_a, run_b, synthetic_store, "--max-rows", "1500")
    out = json_result(done)
    out_dir = run_a / "compare" / "seed1"
    assert out["out"]["json"] == str(out_dir / compare.COMPARE_JSON)
    saved = json.loads((out_dir / compare.COMPARE_JSON).read_text())
    assert (out_dir / compare.COMPARE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(saved["per_feature"]["a"]["partner"]) == 64
    assert saved["n_matched"] == out["n_matched"] and "per_feature" not in out
    # Both seeds recover the 64 synthetic atoms, so most features match across seeds, and
    # matched features fire on the same rows.
    assert out["matched_frac_a"] > 0.5, out
    assert out["activation"]["n_rows"] == 1500
    assert out["activation"]["corr_matched_mean"] > 0.75, out
    assert "matched (cos >= 0.7)" in done.stderr
    json.dumps(out, allow_nan=False)


def test_cli_out_must_be_a_directory(two_runs, tmp_path):
    run_a, run_b = two_runs
    (tmp_path / "taken").write_text("mine")
    for out in (tmp_path / "taken", tmp_path / "taken" / "below"):
        err = one_error_line(sae_jax_cli("compare", run_a, run_b, "--out", out))
        assert f"--out {out}: {tmp_path / 'taken'} is a file, not a directory" in err
    assert (tmp_path / "taken").read_text() == "mine"  # nothing of the user's is touched


def test_cli_decoders_only_and_data_b(two_runs, synthetic_store, tmp_path):
    run_a, run_b = two_runs
    out = compare.run(parse([run_a, run_b, "--out", tmp_path / "c"]))
    assert out["activation"] is None and (tmp_path / "c" / compare.COMPARE_JSON).exists()
    same = compare.compare(run_a, run_b, synthetic_store, synthetic_store, max_rows=500)
    alone = compare.compare(run_a, run_b, synthetic_store, max_rows=500)
    assert same["activation"]["corr_mean"] == pytest.approx(alone["activation"]["corr_mean"])
    from sae_jax.data.importers import import_activations

    np.save(tmp_path / "short.npy", np.zeros((100, 32), np.float32))
    short = import_activations(tmp_path / "short.npy", tmp_path / "short").path
    with pytest.raises(UserError, match="same tokens"):
        compare.compare(run_a, run_b, synthetic_store, short)
    with pytest.raises(UserError, match="DATA_B needs DATA"):
        compare.compare(run_a, run_b, None, short)
