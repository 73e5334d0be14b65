"""`evaluate` on hand-built SAEs whose numbers are known exactly, the large-mean FVU case,
the histograms and the written artifacts."""

import json

import numpy as np
import pytest

from sae_jax.analysis.evaluate import (
    DENSITY_PNG,
    EVAL_JSON,
    density_histogram,
    evaluate,
    l0_histogram,
    write_eval_artifacts,
)
from sae_jax.config import make_config
from sae_jax.data.loader import ArraySpan
from sae_jax.sae import SAE


def identity_sae(d: int, input_scale: float = 1.0) -> SAE:
    """A ReLU SAE with features (+e_i, -e_i): x_hat = relu(x) - relu(-x) = x exactly.
    Feature i fires where x_i > 0, feature d + i where x_i < 0; L0 = nonzeros of x."""
    eye = np.eye(d, dtype=np.float32)
    params = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d, np.float32),
              "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d, np.float32)}
    cfg = make_config(arch="relu", width=2 * d, compute_dtype="float32")
    return SAE(cfg, params, input_scale, 0)


def constant_sae(d: int, b_dec: np.ndarray) -> SAE:
    """Never fires; reconstructs every row as `b_dec`."""
    params = {"W_enc": np.zeros((d, 4), np.float32), "b_enc": -np.ones(4, np.float32),
              "W_dec": np.zeros((4, d), np.float32), "b_dec": np.asarray(b_dec, np.float32)}
    return SAE(make_config(arch="relu", width=4, compute_dtype="float32"), params, 1.0, 0)


def test_exact_reconstruction_known_sparsity():
    # Column 0 always > 0 (feature 0 dense, feature 4 dead); column 1 always 0 (features 1
    # and 5 dead); row r has exactly r % 3 nonzeros among columns 2-3, so L0 = 1 + r % 3.
    n, d = 300, 4
    x = np.zeros((n, d), np.float32)
    x[:, 0] = 1.0 + np.arange(n) % 7
    r = np.arange(n) % 3
    x[r >= 1, 2] = -2.5
    x[r >= 2, 3] = 0.75
    res = evaluate(identity_sae(d, input_scale=0.5), ArraySpan(x), batch_size=64)
    assert res["n_rows"] == n
    assert res["mse"] == 0.0 and res["fvu"] == 0.0 and res["explained_variance"] == 1.0
    assert res["l0"] == pytest.approx(2.0)  # 1 + mean(0, 1, 2)
    assert (res["l0_p10"], res["l0_p50"], res["l0_p90"]) == (1.0, 2.0, 3.0)
    assert res["l0_hist"] == {"values": [1, 2, 3], "counts": [100, 100, 100]}
    # Features: 0 (always), 2 (never: x_2 <= 0), 3 (1/3), 4 (never), 5 (never), 6 (2/3), 7 (never)
    # firing: 0 -> 1.0, 3 -> 1/3, 6 -> 2/3; the other 5 are dead.
    assert res["dead_frac"] == pytest.approx(5 / 8)
    assert res["dense_frac"] == pytest.approx(3 / 8)
    dens = res["feature_density"]
    assert dens["n_dead"] == 5 and dens["n_features"] == 8 and sum(dens["counts"]) == 3
    json.dumps(res, allow_nan=False)  # JSON-friendly as is


def test_large_mean_fvu_is_accurate():
    # mean 1e3, std 1: Σx² − (Σx)²/n in float32 would lose every digit of the variance.
    rng = np.random.default_rng(0)
    n, d = 20_000, 16
    x = (1e3 + rng.standard_normal((n, d))).astype(np.float32)
    x64 = x.astype(np.float64)
    mean = x64.mean(0)
    # Reconstructing every row as the data mean explains nothing: FVU = 1.
    res = evaluate(constant_sae(d, mean), ArraySpan(x), batch_size=4096)
    want = np.square(x64 - mean.astype(np.float32)).sum() / np.square(x64 - mean).sum()
    assert res["fvu"] == pytest.approx(want, rel=1e-5)
    assert res["fvu"] == pytest.approx(1.0, rel=1e-5)
    # A shifted mean: FVU = 1 + |shift|^2 n / total variance, checked against float64.
    shifted = mean + 0.5
    res = evaluate(constant_sae(d, shifted), ArraySpan(x), batch_size=3000)
    want = np.square(x64 - shifted.astype(np.float32)).sum() / np.square(x64 - mean).sum()
    assert res["fvu"] == pytest.approx(want, rel=1e-5)
    assert res["l0"] == 0.0 and res["dead_frac"] == 1.0 and res["l0_hist"] == {
        "values": [0], "counts": [n]}


def test_histograms():
    assert l0_histogram(np.array([3, 0, 3, 5])) == {"values": [0, 3, 5], "counts": [1, 2, 1]}
    fires = np.array([0, 1, 10, 100, 1000, 0])
    h = density_histogram(fires, 1000)
    assert h["bin_edges_log10"][0] == -3.0 and h["bin_edges_log10"][-1] == 0.0
    assert len(h["counts"]) == 12 and h["n_dead"] == 2 and h["n_features"] == 6
    counts = np.array(h["counts"])
    # log10 frequencies -3, -2, -1, 0 land in bins 0, 4, 8 and the last (closed) bin.
    assert counts[[0, 4, 8, 11]].tolist() == [1, 1, 1, 1] and counts.sum() == 4
    assert density_histogram(np.zeros(4, int), 10)["log10_freq_p50"] is None


def test_write_artifacts(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    res = {"step": 7, **evaluate(identity_sae(8), ArraySpan(x)), "fidelity": None,
           "nan_value": float("nan")}
    paths = write_eval_artifacts(res, tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / EVAL_JSON).read_text())
    assert saved["step"] == 7 and saved["fvu"] == res["fvu"] and saved["nan_value"] is None
    assert saved["l0_hist"] == res["l0_hist"]
    assert saved["feature_density"] == res["feature_density"]
    png = (tmp_path / "eval" / DENSITY_PNG).read_bytes()
    assert paths["png"].endswith(DENSITY_PNG)
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_artifacts_to_object_store():
    from sae_jax.files import read_text

    x = np.random.default_rng(2).standard_normal((100, 4)).astype(np.float32)
    res = evaluate(identity_sae(4), ArraySpan(x))
    paths = write_eval_artifacts(res, "memory://evalrun/eval")
    assert json.loads(read_text(paths["json"]))["l0_hist"] == res["l0_hist"]


def test_last_batch_is_padded_so_the_pass_compiles_once():
    from sae_jax.analysis import core_metrics as ev

    rng = np.random.default_rng(3)
    x = rng.standard_normal((301, 5)).astype(np.float32)  # 4 batches of 64 and one of 45
    sae = identity_sae(5, input_scale=0.7)  # a config and scale no other test compiles
    before = ev._batch_sums._cache_size()
    padded = evaluate(sae, ArraySpan(x), batch_size=64)
    assert ev._batch_sums._cache_size() == before + 1
    # Fill rows count nowhere: the result is that of one batch holding every row.
    for sae in (sae, constant_sae(5, np.full(5, 0.3))):
        padded = evaluate(sae, ArraySpan(x), batch_size=64)
        whole = evaluate(sae, ArraySpan(x), batch_size=512)  # one batch: 301 rows + 211 fill
        assert padded["n_rows"] == whole["n_rows"] == 301
        assert padded["l0_hist"] == whole["l0_hist"]
        assert padded["feature_density"] == whole["feature_density"]
        assert padded["fvu"] == pytest.approx(whole["fvu"], rel=1e-6)
        x64 = x.astype(np.float64)
        want = np.square(x64 - np.asarray(sae(x), np.float64)).sum() / np.square(
            x64 - x64.mean(0)).sum()
        assert padded["fvu"] == pytest.approx(want, rel=1e-5)


def test_nan_rows_are_refused():
    from sae_jax.errors import UserError

    x = np.random.default_rng(4).standard_normal((200, 4)).astype(np.float32)
    x[150, 2] = np.nan
    with pytest.raises(UserError, match="eval row 150 .* holds NaN or infinite values"):
        evaluate(identity_sae(4), ArraySpan(x), batch_size=64)
    x[150, 2], x[199, 0] = 0.0, np.inf
    with pytest.raises(UserError, match="eval row 199 "):
        evaluate(identity_sae(4), ArraySpan(x), batch_size=64)


# ---------------------------------------------------------------------------- the command


def test_eval_command_on_a_minilm_run_and_a_damaged_copy(tmp_path_factory, tmp_path):
    """`sae-jax eval` from the shell: core metrics and downstream fidelity on the tiny MiniLM
    run; the same rows with a NaN in the held-out tail fail with one line."""
    from conftest import json_result, one_error_line, sae_jax_cli
    from test_steer import tiny_minilm_run

    from sae_jax.data.store import StoreWriter, open_store

    store, run = tiny_minilm_run(tmp_path_factory)
    r = json_result(sae_jax_cli("eval", run, store, "--fidelity-sequences", 4))
    assert r["n_rows"] == 150 and 0 < r["fvu"] < 1 and r["l0"] == pytest.approx(4.0)
    assert r["fidelity"]["n_sequences"] == 4 and 0 < r["fidelity"]["fidelity_recovered"] < 1
    assert json.loads((run / "eval" / EVAL_JSON).read_text())["fvu"] == r["fvu"]
    # The downstream measure ran, so each random baseline is measured downstream too.
    for name in ("random_directions", "random_init"):
        assert isinstance(r["baselines"][name]["fidelity_recovered"], float), name
        assert r["margins"][name]["fidelity_recovered"] == pytest.approx(
            r["fidelity"]["fidelity_recovered"] - r["baselines"][name]["fidelity_recovered"])
        assert r["margins"][name]["fvu"] > 0

    rows = open_store(store).span().read(0, 3000).astype(np.float32)
    rows[2990, 7] = np.nan  # in the held-out tail (the last 150 rows)
    with StoreWriter(tmp_path / "damaged", d_in=rows.shape[1]) as w:
        w.append(rows)
    err = one_error_line(sae_jax_cli("eval", run, tmp_path / "damaged"))
    assert "eval row 140 (row 2990 of the store) holds NaN or infinite values" in err
