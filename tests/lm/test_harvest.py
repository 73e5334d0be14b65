"""Harvesting activations into a store: MiniLM end to end, the generic harvester, clean-up."""

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SAE_JAX
from jax.tree_util import Partial

from sae_jax.data.store import StoreWriter, open_store
from sae_jax.errors import UserError
from sae_jax.lm import minilm
from sae_jax.lm.corpus import NO_POSITION, Corpus, sequences, stdlib_corpus
from sae_jax.lm.harvest import harvest, run_harvest
from sae_jax.lm.hooks import minilm_activations
from sae_jax.mesh import make_mesh

CLS, SEP = 101, 102
SEQ_LEN, LAYER = 32, 2


def _read(store):
    return (store.rows.read().result(), store.token_ids.read().result(),
            store.positions.read().result())


def _sequence_index(tokenizer, n_docs):
    """{(doc, position): (sequence, column)} and the sequences of the first stdlib documents."""
    seqs = list(sequences(itertools.islice(stdlib_corpus(), n_docs), tokenizer, SEQ_LEN))
    where = {}
    for i, s in enumerate(seqs):
        for col in np.flatnonzero(s.positions != NO_POSITION):
            where[(s.doc, int(s.positions[col]))] = (i, int(col))
    return seqs, where


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    out = tmp_path_factory.mktemp("harvest") / "data"
    meta = run_harvest(out, layer=LAYER, max_tokens=1000, seq_len=SEQ_LEN, batch_size=5,
                       progress=False)
    return meta, open_store(out)


def test_minilm_harvest_writes_exactly_max_tokens_real_tokens(harvested, tokenizer):
    meta, store = harvested
    rows, ids, pos = _read(store)
    assert rows.shape == (1000, minilm.D_MODEL) and ids.shape == (1000,) and pos.shape == (1000, 2)
    assert meta["n_rows"] == 1000 and meta["batch_size"] == 8  # 5 rounded up to the 8 devices
    assert {meta[k] for k in ("layer", "seq_len", "keep_special")} == {LAYER, SEQ_LEN, False}
    assert meta["model"] == "all-MiniLM-L6-v2" and "after layer 2" in meta["hook"]
    assert meta["corpus"].startswith("python-stdlib") and meta["tokenizer"]["vocab_size"] == 30522
    assert not np.isin(ids, [CLS, SEP, 0]).any() and (pos[:, 1] >= 0).all()
    # Rows are the corpus's tokens in order: each document's positions run 0, 1, 2, ...
    seqs, where = _sequence_index(tokenizer, int(pos[-1, 0]) + 1)
    expected = [(s.doc, int(p), int(t)) for s in seqs
                for t, p in zip(s.input_ids, s.positions) if p != NO_POSITION][:1000]
    assert [(int(d), int(p), int(t)) for (d, p), t in zip(pos, ids)] == expected


def test_harvested_rows_equal_the_model_at_that_token(harvested, params, tokenizer):
    _, store = harvested
    rows, _, pos = _read(store)
    seqs, where = _sequence_index(tokenizer, int(pos[-1, 0]) + 1)
    forward = jax.jit(minilm.forward)
    for r in (0, 1, 137, 500, 999):
        i, col = where[tuple(int(v) for v in pos[r])]
        states = forward(params, seqs[i].input_ids[None], seqs[i].attention_mask[None])
        np.testing.assert_allclose(rows[r], np.asarray(states[LAYER, 0, col]), atol=2e-5, rtol=0)


def test_keep_special_keeps_cls_and_sep(tmp_path, harvested):
    meta = run_harvest(tmp_path / "d", layer=LAYER, max_tokens=300, seq_len=SEQ_LEN,
                       batch_size=8, keep_special=True, progress=False)
    rows, ids, pos = _read(open_store(tmp_path / "d"))
    assert meta["keep_special"] is True and len(ids) == 300
    special = np.isin(ids, [CLS, SEP])
    assert ids[0] == CLS and (pos[special, 1] == NO_POSITION).all()
    assert (pos[~special, 1] >= 0).all()
    assert (ids == CLS).sum() >= (ids == SEP).sum() >= (ids == CLS).sum() - 1
    # The document tokens and their activations are the same as without the flag.
    plain_rows, plain_ids, _ = _read(harvested[1])
    n = int((~special).sum())
    np.testing.assert_array_equal(ids[~special], plain_ids[:n])
    np.testing.assert_allclose(rows[~special], plain_rows[:n], atol=1e-5)


def _toy_corpus(texts):
    return Corpus("toy", lambda: iter((f"t{i}", t) for i, t in enumerate(texts)))


def _toy_fn(ids, mask):
    """(n, L, 3): the token id, the mask and the column, so rows are easy to check."""
    cols = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return jnp.stack([ids, mask, cols], -1).astype(jnp.float32)


@pytest.mark.parametrize("max_tokens", [1, 37, 64, 65, 10_000])
def test_generic_harvester_with_a_user_function(tmp_path, tokenizer, max_tokens):
    texts = ["alpha beta gamma delta " * 8, "one two three.", "", "the end of it all " * 3]
    seqs = list(sequences(_toy_corpus(texts), tokenizer, 16))
    n_doc_tokens = sum(int((s.positions != NO_POSITION).sum()) for s in seqs)
    with StoreWriter(tmp_path / "d", d_in=3, with_tokens=True, chunk_rows=16) as w:
        stats = harvest(_toy_fn, iter(seqs), w, max_tokens=max_tokens, batch_size=3,
                        progress=False, mesh=make_mesh("data:2,model:4"))
    rows, ids, pos = _read(open_store(tmp_path / "d"))
    n = min(max_tokens, n_doc_tokens)
    assert len(rows) == stats["n_rows"] == n and stats["batch_size"] == 4
    assert stats["corpus_exhausted"] == (max_tokens > n_doc_tokens)
    np.testing.assert_array_equal(rows[:, 0], ids)  # the row is the function's output there
    assert (rows[:, 1] == 1).all() and (rows[:, 2] >= 1).all()
    assert stats["n_documents"] == int(pos[-1, 0]) + 1


def test_partial_weights_are_jit_arguments(tmp_path, tokenizer):
    def scaled(weights, ids, mask):
        return _toy_fn(ids, mask) * weights

    fn = Partial(scaled, jnp.array([2.0, 1.0, 1.0]))
    seqs = sequences(_toy_corpus(["some words here"]), tokenizer, 8)
    with StoreWriter(tmp_path / "d", d_in=3, with_tokens=True) as w:
        harvest(fn, seqs, w, max_tokens=10, batch_size=8, progress=False)
    rows, ids, _ = _read(open_store(tmp_path / "d"))
    np.testing.assert_array_equal(rows[:, 0], 2 * ids)


def _leftovers(path: Path):
    return sorted(p.name for p in path.iterdir())


def test_keyboard_interrupt_in_activations_fn_leaves_nothing(tmp_path, tokenizer):
    def interrupted(ids, mask):
        raise KeyboardInterrupt

    seqs = sequences(_toy_corpus(["some words here"]), tokenizer, 8)
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(tmp_path / "d", d_in=3, with_tokens=True) as w:
            harvest(interrupted, seqs, w, max_tokens=10, batch_size=8, progress=False)
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_mid_harvest_leaves_nothing(tmp_path, tokenizer):
    appended = []

    def seqs():  # Ctrl-C arrives after several chunks were written
        for i, s in enumerate(sequences(_toy_corpus(["word " * 400]), tokenizer, 16)):
            if i == 20:
                appended.append(w.n_rows)
                raise KeyboardInterrupt
            yield s

    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(tmp_path / "d", d_in=3, with_tokens=True, chunk_rows=16) as w:
            harvest(_toy_fn, seqs(), w, max_tokens=10_000, batch_size=4, progress=False)
    assert appended[0] > 0 and _leftovers(tmp_path) == []


def test_sigint_to_a_running_harvest_leaves_nothing(tmp_path):
    code = ("from sae_jax.lm.harvest import run_harvest; "
            f"run_harvest({str(tmp_path / 'd')!r}, layer=1, max_tokens=10**7, seq_len=64, "
            "progress=False)")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60

    def started():  # the first chunk of rows is on disk
        return any((p / "rows" / "c").exists() for p in tmp_path.glob(".d.*"))

    while time.monotonic() < deadline and proc.poll() is None and not started():
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()
    assert started()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and b"KeyboardInterrupt" in err
    assert _leftovers(tmp_path) == []


def test_sigterm_to_sae_jax_harvest_leaves_nothing(tmp_path):
    """A preempted VM sends SIGTERM: the command exits 143 with one line, no store left."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([str(SAE_JAX), "harvest", str(tmp_path / "d"), "--layer", "1",
                             "--max-tokens", str(10**7), "--seq-len", "64"], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (time.monotonic() < deadline and proc.poll() is None
           and not any((p / "rows" / "c").exists() for p in tmp_path.glob(".d.*"))):
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "harvest stopped by SIGTERM; nothing was kept" in err and "Traceback" not in err
    assert _leftovers(tmp_path) == []


def test_bad_input_is_a_user_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    cases = [
        ({"model": "gpt2"}, "unknown model"),
        ({"layer": 7}, "layer must be in 0..6"),
        ({"layer": -1}, "layer must be in 0..6"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seq_len": 2}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"dtype": "float16"}, "dtype"),
        ({"pair": "attn"}, "pair must be one of mlp, block"),
        ({"pair": "mlp", "layer": 0}, "--pair needs a block"),
        ({"corpus": [str(tmp_path / "missing.txt")]}, "does not exist"),
        ({"corpus": str(tmp_path / "empty.txt")}, "no text"),
    ]
    for kwargs, match in cases:
        with pytest.raises(UserError, match=match):
            run_harvest(tmp_path / "d", **{"max_tokens": 10, "progress": False, **kwargs})
        assert _leftovers(tmp_path) == ["empty.txt", "taken"], kwargs
    with pytest.raises(UserError, match="not an empty directory"):
        run_harvest(tmp_path / "taken", max_tokens=10, progress=False)
    with pytest.raises(UserError, match="layer"):
        minilm_activations(7, params={})

