"""Coverage numbers on SAEs whose answer is known: a perfect SAE leaves nothing unexplained,
a mean-only SAE explains nothing and never fires; per-document pooling and the dark-matter
list checked by hand."""

import numpy as np
import pytest

from sae_jax.analysis import coverage
from sae_jax.analysis.moments import rows_mean
from sae_jax.config import make_config
from sae_jax.data.store import open_store
from sae_jax.sae import SAE


def perfect_sae(d: int) -> SAE:
    """ReLU features (+e_i, -e_i): x̂ = relu(x) - relu(-x) = x exactly."""
    eye = np.eye(d, dtype=np.float32)
    p = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d, np.float32),
         "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d, np.float32)}
    return SAE(make_config(arch="relu", width=2 * d, compute_dtype="float32"), p, 1.0, 0)


def mean_sae(mean: np.ndarray) -> SAE:
    """Never fires (zero encoder, negative bias); reconstructs every row as `mean`."""
    d = len(mean)
    p = {"W_enc": np.zeros((d, 4), np.float32), "b_enc": -np.ones(4, np.float32),
         "W_dec": np.zeros((4, d), np.float32), "b_dec": np.asarray(mean, np.float32)}
    return SAE(make_config(arch="relu", width=4, compute_dtype="float32"), p, 1.0, 0)


@pytest.fixture(scope="module")
def heldout(synthetic_store):
    return open_store(synthetic_store).split(0.05)[1]


def fake_tokens(n: int, doc_len: int = 50):
    """Token ids and (doc, pos) positions: documents of `doc_len` consecutive rows."""
    rows = np.arange(n)
    return rows % 97, np.stack([rows // doc_len, rows % doc_len], 1)


def test_perfect_sae_leaves_nothing_unexplained(heldout):
    mean = rows_mean(heldout)
    hp = coverage.heldout_pass(perfect_sae(heldout.d_in), heldout, mean, [0, 1], batch=512)
    assert len(hp.err) == len(heldout) == 2000
    np.testing.assert_allclose(hp.err, 0.0, atol=1e-9)
    assert hp.acts.shape == (2000, 2) and (hp.acts >= 0).all() and hp.acts.max() > 0
    tok, pos = fake_tokens(len(heldout))
    cov = coverage.token_coverage(hp, pos, tok, heldout.start, None, n_dark=3)
    assert cov["fvu"] == pytest.approx(0.0, abs=1e-9)
    assert cov["per_token"]["p99"] == pytest.approx(0.0, abs=1e-9)
    assert cov["per_document"]["n_documents"] == 40
    assert cov["no_active_fraction"] == 0.0
    assert cov["l0_mean"] == pytest.approx(np.mean(np.sum(heldout.read(0, 2000) != 0, 1)))


def test_mean_sae_explains_nothing(heldout):
    mean = rows_mean(heldout)
    hp = coverage.heldout_pass(mean_sae(mean), heldout, mean, batch=512)
    assert hp.acts is None
    np.testing.assert_allclose(hp.err / hp.dev, 1.0, rtol=1e-5)
    tok, pos = fake_tokens(len(heldout))
    cov = coverage.token_coverage(hp, pos, tok, heldout.start, None)
    assert cov["fvu"] == pytest.approx(1.0, rel=1e-5)
    assert cov["per_token"]["p10"] == pytest.approx(1.0, rel=1e-5)
    assert cov["per_document"]["p50"] == pytest.approx(1.0, rel=1e-5)
    assert cov["no_active_fraction"] == 1.0 and cov["l0_mean"] == 0.0
    # The pooled FVU is `evaluate`'s (same rows, same mean).
    from sae_jax.analysis.evaluate import evaluate

    assert evaluate(mean_sae(mean), heldout)["fvu"] == pytest.approx(cov["fvu"], rel=1e-4)


def test_per_document_is_pooled():
    docs = coverage.per_document(np.array([1.0, 1.0, 2.0]), np.array([2.0, 2.0, 2.0]),
                                 np.array([5, 5, 9]))
    assert docs["doc"].tolist() == [5, 9] and docs["n_tokens"].tolist() == [2, 1]
    assert docs["unexplained"].tolist() == [0.5, 1.0]


def test_dark_matter_windows_stay_in_their_document():
    err = np.array([1.0, 9.0, 2.0, 3.0, 8.0, 1.0])
    hp = coverage.HeldoutPass(err, np.full(6, 2.0), np.array([3, 0, 1, 2, 5, 4]), None)
    tok = np.arange(100, 106)
    pos = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    dark = coverage.dark_matter(hp, tok, pos, 1000, None, n=2, before=8, after=4)
    assert [d["row"] for d in dark] == [1001, 1004]
    assert dark[0]["tokens"] == ["<100>", "<101>", "<102>"] and dark[0]["highlight_index"] == 1
    assert dark[1]["tokens"] == ["<103>", "<104>", "<105>"] and dark[1]["highlight_index"] == 1
    assert dark[0]["value"] == 9.0 and dark[0]["unexplained"] == 4.5 and dark[0]["n_active"] == 0
    assert dark[1]["errors"] == [3.0, 8.0, 1.0]
    assert dark[1]["activations"] == [0.5, 5.5, 0.0]  # in excess of the median error 2.5


def test_histogram_and_quantiles():
    h = coverage.histogram([-1.0, 0.1, 0.5, 0.99, 7.0, None], 0.0, 1.0, 4)
    assert h == {"lo": 0.0, "hi": 1.0, "counts": [2, 0, 1, 2]}
    q = coverage.quantiles([1.0, 2.0, 3.0, None])
    assert q["p50"] == 2.0 and q["mean"] == 2.0
    assert coverage.quantiles([None])["p50"] is None
