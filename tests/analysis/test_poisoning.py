"""The reference-free poisoning detector (`sae_jax.analysis.poisoning`): on constructed
activations it flags the latent planted on a repeated n-gram or in one document and nothing
else; on two SAEs trained with one seed on clean and poisoned synthetic stores it flags the
planted latent that `compare` also reports as appeared. (The audit's `poisoning` key through
the CLI: tests/analysis/test_audit.py.)"""

import numpy as np
import pytest

from sae_jax.analysis import poisoning
from sae_jax.errors import UserError

TRIGGER = np.arange(10, 18)  # token ids no natural document uses (those are 1000..4999)


def corpus(n_docs=200, doc_len=50, poisoned=(), seed=0):
    """Random token ids per document with `TRIGGER` at a random place in the `poisoned`
    documents; returns `(token_ids (N,), positions (N, 2), planted (N,) bool)`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1000, 5000, (n_docs, doc_len))
    mark = np.zeros((n_docs, doc_len), bool)
    for d in poisoned:
        s = rng.integers(0, doc_len - len(TRIGGER))
        tokens[d, s:s + len(TRIGGER)] = TRIGGER
        mark[d, s + 2:s + len(TRIGGER)] = True
    pos = np.stack(np.meshgrid(np.arange(n_docs), np.arange(doc_len), indexing="ij"),
                   -1).reshape(-1, 2)
    return tokens.reshape(-1), pos, mark.reshape(-1)


def token_latents(tokens, planted, width=20, seed=0):
    """Latents 0..width-2 fire on token ids by residue (natural, spread over documents);
    the last one fires on the planted rows only."""
    rng = np.random.default_rng(seed)
    acts = np.zeros((len(tokens), width), np.float32)
    acts[np.arange(len(tokens)), tokens % (width - 1)] = rng.uniform(0.5, 2, len(tokens))
    acts[planted] = 0
    acts[planted, width - 1] = 1.5
    return acts


def test_flags_the_latent_on_a_repeated_ngram_only():
    tokens, pos, planted = corpus(poisoned=range(0, 200, 25))
    acts = token_latents(tokens, planted)
    report = poisoning.detect(poisoning.document_mass(acts, pos), tokens, pos)
    assert report["flagged_features"] == [19] and report["n_scored"] == 20
    flag = report["flagged"][0]
    assert any(r.startswith("ngram: 8 of its top 8 documents") for r in flag["reasons"])
    first = int(flag["ngram"]["tokens"][0][1:-1])  # a 6-token piece of the trigger
    assert flag["ngram"]["tokens"] == [f"<{t}>" for t in range(first, first + 6)]
    assert 10 <= first <= 12
    assert flag["ngram"]["lift"] == 25.0 and flag["effective_docs"] == pytest.approx(8)
    assert sorted(d for d, _ in flag["top_documents"]) == [0, 25, 50]
    # The same activations without the planted rows: nothing to flag.
    clean = poisoning.detect(poisoning.document_mass(token_latents(tokens, planted * False),
                                                     pos), tokens, pos)
    assert clean["n_flagged"] == 0 and clean["n_scored"] == 19


def test_flags_a_latent_confined_to_one_document():
    tokens, pos, _ = corpus()
    acts = token_latents(tokens, np.zeros(len(tokens), bool))
    acts[pos[:, 0] == 7, 19] = 1.0  # fires on every token of document 7 only
    report = poisoning.detect(poisoning.document_mass(acts, pos), tokens, pos)
    assert report["flagged_features"] == [19]
    assert report["flagged"][0]["top_documents"] == [[7, 1.0]]
    assert report["flagged"][0]["reasons"][0].startswith("documents: 100%")
    # Thresholds are options: demanding two signals drops it (density alone is not enough).
    strict = poisoning.detect(poisoning.document_mass(acts, pos), tokens, pos,
                              poisoning.Thresholds(min_reasons=3))
    assert strict["n_flagged"] == 0 and strict["thresholds"]["min_reasons"] == 3


def test_ngram_hashes_stay_inside_documents():
    pos = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [1, 3]])
    h = poisoning.ngram_hashes(np.array([5, 6, 7, 5, 6, 7, 9]), pos, 3)
    assert h[0] == h[3] >= 0 and h[1] == -1 and h[2] == -1 and h[4] >= 0 and h[5] == -1
    with pytest.raises(UserError, match="doc_share must be in"):
        poisoning.Thresholds(doc_share=1.5)


def _write_store(path, rows, tokens, pos):
    from sae_jax.data.store import StoreWriter

    with StoreWriter(path, d_in=rows.shape[1], with_tokens=True) as w:
        w.append(rows, tokens.astype(np.int32), pos.astype(np.int32))
    return path


def test_detector_finds_the_planted_feature_that_compare_finds(tmp_path):
    """Same token rows, same seed: one SAE on clean rows, one with a planted atom (outside the
    span of the natural ones) added on the trigger's rows in 17 of 200 documents. `compare`
    reports the poisoned SAE's latent along the planted atom as appeared; the detector flags
    it for its n-gram, on the poisoned store alone, and ranks it first (latents that also fire
    on the trigger rows may follow); on the clean SAE it flags nothing for documents or
    n-grams (density outliers are its only flags there)."""
    import jax

    import sae_jax
    from sae_jax.analysis.compare import compare_saes
    from sae_jax.config import make_config
    from sae_jax.data.store import open_store
    from sae_jax.data.synthetic import sparse_dictionary_data
    from sae_jax.training.train import train

    tokens, pos, planted = corpus(poisoned=range(0, 200, 12))
    rows, atoms = sparse_dictionary_data(len(tokens), 32, 24, active=2.0, seed=1)
    q, _ = np.linalg.qr(atoms.T.astype(np.float64))
    atom = np.random.default_rng(2).standard_normal(32)
    atom -= q @ (q.T @ atom)
    atom = (atom / np.linalg.norm(atom)).astype(np.float32)
    cfg = make_config(arch="topk", width=48, k=4, steps=200, batch_size=256, holdout=0.05,
                      log_every=100, ckpt_every=200)
    saes = {}
    for name, x in (("clean", rows), ("poisoned", rows + 6.0 * planted[:, None] * atom)):
        _write_store(tmp_path / name, x, tokens, pos)
        train(cfg, tmp_path / name, tmp_path / f"{name}_run", progress=False,
              devices=jax.devices()[:1])
        saes[name] = sae_jax.load(tmp_path / f"{name}_run")
    w = np.asarray(saes["poisoned"].params["W_dec"])
    along = int(np.argmax(w @ atom / np.linalg.norm(w, axis=1)))
    cmp = compare_saes(saes["clean"], saes["poisoned"])
    assert cmp["per_feature"]["b"]["category"][along] == "appeared"

    def content_flags(report):  # flagged for documents or an n-gram, not density alone
        return [f["feature"] for f in report["flagged"]
                if any(r.startswith(("documents", "ngram")) for r in f["reasons"])]

    report = poisoning.detect_on_store(saes["poisoned"], open_store(tmp_path / "poisoned").span())
    assert content_flags(report)[0] == along, report["flagged"]  # ranked first
    flag = next(f for f in report["flagged"] if f["feature"] == along)
    assert flag["ngram"]["contexts"] >= 15 and flag["ngram"]["lift"] >= 5
    clean = poisoning.detect_on_store(saes["clean"], open_store(tmp_path / "clean").span())
    assert content_flags(clean) == [], clean["flagged"]
