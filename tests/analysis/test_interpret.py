"""The streaming feature catalog equals a dense brute-force computation on a small case."""

import json

import jax
import numpy as np
import pytest

from sae_jax import saes
from sae_jax.analysis.catalog import read_catalog, write_catalog
from sae_jax.analysis.interpret import build_catalog
from sae_jax.config import make_config
from sae_jax.data.store import StoreWriter
from sae_jax.errors import UserError
from sae_jax.sae import SAE

N, D, F, VOCAB = 1500, 16, 24, 50


class _Tok:
    """A stand-in tokenizer: id -> "t<id>"."""

    def id_to_token(self, i):
        return f"t{i}"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(sae, span, rows, token ids, docs): a random ReLU SAE over a small store whose
    documents have random lengths (so windows hit document edges)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    tok = rng.integers(0, VOCAB, N).astype(np.int32)
    lengths = rng.integers(1, 40, N)
    docs = np.repeat(np.arange(N), lengths)[:N].astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in np.bincount(docs)]).astype(np.int32)
    path = tmp_path_factory.mktemp("interp") / "store"
    with StoreWriter(path, d_in=D, with_tokens=True, meta={"model": "toy", "layer": 1},
                     chunk_rows=256) as w:
        w.append(x, token_ids=tok, positions=np.stack([docs, pos], 1))
    from sae_jax.data.store import open_store

    store = open_store(path)
    cfg = make_config(arch="relu", width=F)
    params = saes.init(jax.random.key(1), cfg, D)
    # A negative bias makes features fire on a few percent of rows, as trained ones do.
    w_enc = rng.standard_normal((D, F)).astype(np.float32) / np.sqrt(D)
    params = {**params, "W_enc": jax.numpy.asarray(w_enc),
              "b_enc": jax.numpy.full((F,), -1.2, jax.numpy.float32)}
    sae = SAE(cfg, params, 1.0, 0)
    return sae, store.span(), x, tok, docs


def _dense(sae, x):
    return np.asarray(sae.encode(x))


def _catalog(case, **kw):
    sae, span = case[0], case[1]
    kw.setdefault("batch_size", 256)
    return build_catalog(sae, span, tokenizer=_Tok(), top_k=5, n_sample=20, **kw)


def test_streaming_equals_brute_force(case):
    sae, _, x, tok, docs = case
    f = _dense(sae, x)
    cat = _catalog(case)
    assert [c["id"] for c in cat.features] == list(range(F))
    fired = 0
    for j, feat in enumerate(cat.features):
        col = f[:, j]
        active = col > 0
        assert feat["count"] == int(active.sum())
        assert feat["frequency"] == pytest.approx(active.mean(), rel=1e-5)
        mean = col[active].mean() if active.any() else 0.0
        assert feat["mean_activation"] == pytest.approx(mean, rel=1e-4, abs=1e-6)
        assert feat["max_activation"] == pytest.approx(col.max(), rel=1e-5, abs=1e-6)
        # Top-k: values and rows (stable order: larger value first, then lower row).
        order = np.lexsort((np.arange(N), -col))[:5]
        order = order[col[order] > 0]
        got_rows = [e["row"] for e in feat["top_examples"]]
        assert got_rows == order.tolist()
        np.testing.assert_allclose([e["value"] for e in feat["top_examples"]], col[order],
                                   rtol=1e-5)
        # Top tokens: exact counts, most counted first, ties by lower token id.
        ids, counts = np.unique(tok[active], return_counts=True)
        want = sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: (-t[1], t[0]))[:10]
        assert feat["top_tokens"] == [[f"t{i}", c] for i, c in want]
        # Histogram counts every activation once.
        assert sum(feat["activation_histogram"]) == feat["count"]
        # Quantile examples are active rows, grouped by increasing activation.
        qvals = [e["value"] for g in feat["quantile_examples"] for e in g["examples"]]
        assert all(v > 0 for v in qvals)
        assert qvals == sorted(qvals)
        for g in feat["quantile_examples"]:
            for e in g["examples"]:
                assert col[e["row"]] == pytest.approx(e["value"], rel=1e-5)
        fired += bool(active.any())
    assert fired >= F // 2, "the toy SAE should have mostly live features"
    assert cat.header["n_rows"] == N and cat.header["top_tokens_exact"] is True


def test_batch_size_does_not_change_results(case):
    a = _catalog(case, batch_size=256).to_dict()
    b = _catalog(case, batch_size=97).to_dict()
    c = _catalog(case, batch_size=4096).to_dict()
    for other in (b, c):
        assert other["features"] == a["features"]


def test_contexts_stay_in_document(case):
    sae, _, x, tok, docs = case
    f = _dense(sae, x)
    cat = _catalog(case, before=8, after=4)
    n_examples = clipped = 0
    for j, feat in enumerate(cat.features):
        exs = feat["top_examples"] + [e for g in feat["quantile_examples"]
                                      for e in g["examples"]]
        for e in exs:
            r, h = e["row"], e["highlight_index"]
            lo, hi = r - h, r - h + len(e["tokens"])
            assert h <= 8 and len(e["tokens"]) - h - 1 <= 4
            assert (docs[lo:hi] == docs[r]).all(), "context crosses a document boundary"
            # Maximal within the document and the window.
            assert h == 8 or lo == 0 or docs[lo - 1] != docs[r]
            assert hi - r - 1 == 4 or hi == N or docs[hi] != docs[r]
            clipped += len(e["tokens"]) < 13
            assert e["tokens"] == [f"t{t}" for t in tok[lo:hi]]
            np.testing.assert_allclose(e["activations"], f[lo:hi, j], rtol=1e-5, atol=1e-6)
            assert e["value"] == e["activations"][h]
            assert e["doc"] == int(docs[r])
            n_examples += 1
    assert n_examples > 50 and clipped > 0  # short documents really cut windows


def test_catalog_json_is_portable(case, tmp_path):
    cat = _catalog(case, features=6)
    assert [f["id"] for f in cat.features] == list(range(6))
    path = write_catalog(cat, tmp_path)
    assert path.endswith("feature_catalog.json")
    text = open(path, encoding="utf-8").read()
    raw = json.loads(text)
    assert json.loads(json.dumps(raw)) == raw
    assert raw == json.loads(cat.to_json())  # no numpy types survive (json.dumps would fail)
    for key in ("model", "layer", "run", "n_rows", "created"):
        assert key in raw["header"]
    feat = raw["features"][0]
    for key in ("id", "frequency", "mean_activation", "max_activation", "top_examples",
                "quantile_examples", "top_tokens", "label"):
        assert key in feat
    assert feat["label"] is None
    assert read_catalog(tmp_path).to_dict() == raw

    def walk(v):
        assert type(v) in (dict, list, str, int, float, bool, type(None)), type(v)
        for c in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else []):
            walk(c)

    walk(cat.to_dict())


def test_feature_subset_and_bad_input(case):
    sae, span = case[0], case[1]
    sub = _catalog(case, features=[3, 7])
    full = _catalog(case)
    assert [f["id"] for f in sub.features] == [3, 7]
    assert sub.features[1] == full.features[7]
    with pytest.raises(UserError):
        build_catalog(sae, span, features=[F])
