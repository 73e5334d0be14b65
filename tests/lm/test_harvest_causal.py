"""`sae-jax harvest --model FOLDER` on the tiny random-weight Llama and Gemma 2 folders: the
stored rows are the model's own activations at each stored (document, position), BOS is
stored only with --keep-special, pairs are 2·d wide, every mesh gives the same rows, the meta
follows the issue-16 contract, and bad input is one line."""

import json
import shutil

import numpy as np
import pytest
from conftest import CAUSAL_FIXTURES, json_result, one_error_line, sae_jax_cli

from sae_jax.data.store import open_store
from sae_jax.errors import UserError
from sae_jax.lm import causal, hf, hooks
from sae_jax.lm.corpus import NO_POSITION, make_corpus, sequences
from sae_jax.lm.harvest import run_harvest

SEQ_LEN, MAX_TOKENS = 24, 400
LLAMA, GEMMA = CAUSAL_FIXTURES / "llama", CAUSAL_FIXTURES / "gemma2"
CONTRACT = {"source", "model", "model_path", "model_type", "weight_files", "model_sha256",
            "model_dtype", "layer", "site", "n_layers", "d_model", "seq_len", "keep_special",
            "bos", "tokenizer", "corpus"}
WORDS = ("the model reads a token and writes a vector into the stream while every head "
         "attends to what came before it def return class import 42 7 ( ) : , .").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A plain-text corpus of 30 paragraphs of 5..60 words (some split over sequences)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS, rng.integers(5, 60)))
                                for _ in range(30)))
    return path


@pytest.fixture(scope="module")
def harvests(tmp_path_factory, corpus):
    """name -> (meta, rows, token ids, positions) of one CLI harvest each."""
    tmp = tmp_path_factory.mktemp("harvests")
    common = ("--seq-len", SEQ_LEN, "--max-tokens", MAX_TOKENS, "--batch-size", 8,
              "--corpus", corpus)
    runs = {
        "llama": (LLAMA, "--layer", 1, "--mesh", "data:8"),  # progress bar on
        "llama_2x4": (LLAMA, "--layer", 1, "--mesh", "data:2,model:4", "--quiet"),
        "llama_8": (LLAMA, "--layer", 1, "--mesh", "model:8", "--quiet"),
        "llama_bos": (LLAMA, "--layer", 1, "--keep-special", "--quiet"),
        "gemma_mlp_out": (GEMMA, "--layer", 2, "--site", "mlp_out", "--quiet"),
        "gemma_pair": (GEMMA, "--layer", 2, "--pair", "mlp", "--mesh", "data:2,model:4",
                       "--quiet"),
    }
    out = {}
    for name, (folder, *args) in runs.items():
        proc = sae_jax_cli("harvest", tmp / name, "--model", folder, *args, *common)
        meta = json_result(proc)
        if name == "llama":
            assert "tok/s" in proc.stderr  # the progress bar shows the rate
        store = open_store(tmp / name)
        out[name] = (meta, store.rows.read().result(), store.token_ids.read().result(),
                     store.positions.read().result())
    return out


def _model_rows(folder, corpus, layer, site, keep_special=False):
    """What the rows must be: the model run in-process on the same sequences, taken at the
    tokens harvest keeps, in corpus order, with their ids and (document, position)."""
    m = causal.load(folder)
    seqs = list(sequences(make_corpus(str(corpus)), m.tokenizer, SEQ_LEN, specials=m.specials))
    ids = np.stack([s.input_ids for s in seqs])
    acts = m.activations(ids, layer, site)
    keep = np.stack([s.attention_mask.astype(bool) & (keep_special | (s.positions != NO_POSITION))
                     for s in seqs])
    r, c = np.nonzero(keep)
    pos = np.stack([[seqs[i].doc for i in r], [seqs[i].positions[j] for i, j in zip(r, c)]], 1)
    return acts[r, c][:MAX_TOKENS], ids[r, c][:MAX_TOKENS], pos[:MAX_TOKENS], m


@pytest.mark.parametrize("name,folder,layer,site", [
    ("llama", LLAMA, 1, "resid"), ("gemma_mlp_out", GEMMA, 2, "mlp_out"),
    ("gemma_pair", GEMMA, 2, "mlp")])
def test_rows_are_the_models_activations_at_each_token(harvests, corpus, name, folder, layer,
                                                       site):
    meta, rows, ids, pos = harvests[name]
    want_rows, want_ids, want_pos, m = _model_rows(folder, corpus, layer, site)
    assert rows.shape == (MAX_TOKENS, m.d_model * (2 if site == "mlp" else 1))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_allclose(rows, want_rows, atol=1e-5, rtol=1e-5)
    assert not np.isin(ids, [m.specials.cls]).any() and (pos[:, 1] >= 0).all()  # no BOS


def test_meta_follows_the_contract(harvests):
    meta = harvests["llama"][0]
    assert CONTRACT <= set(meta), CONTRACT - set(meta)
    assert meta["model_path"] == str(LLAMA.resolve()) and meta["model_type"] == "llama"
    assert meta["model_sha256"] == hf.weights_sha256(LLAMA)
    assert {meta[k] for k in ("layer", "n_layers", "d_model")} == {1, 3, 32}
    assert (meta["site"], meta["model_dtype"], meta["bos"], meta["n_rows"]) == (
        "resid", "float32", True, MAX_TOKENS)
    assert meta["tokenizer"]["special_ids"]["bos"] == 1 and "pair" not in meta
    assert meta["corpus"].startswith("files:")
    assert hooks.store_model(meta).n_layers == 3  # eval/steer reopen it by the meta
    pair = harvests["gemma_pair"][0]
    assert pair["pair"] == {"d_in": 32, "d_out": 32, "site": "mlp"}
    assert pair["site"] == "mlp_out" and pair["d_in"] == 64  # the transcoder writes mlp_out
    assert harvests["gemma_mlp_out"][0]["site"] == "mlp_out"


def test_every_mesh_stores_the_same_rows(harvests):
    _, rows, ids, pos = harvests["llama"]
    for name in ("llama_2x4", "llama_8"):
        _, other, other_ids, other_pos = harvests[name]
        np.testing.assert_array_equal(other_ids, ids)
        np.testing.assert_array_equal(other_pos, pos)
        np.testing.assert_allclose(other, rows, atol=1e-5, rtol=1e-5)


def test_keep_special_stores_bos(harvests, corpus):
    meta, rows, ids, pos = harvests["llama_bos"]
    want_rows, want_ids, want_pos, m = _model_rows(LLAMA, corpus, 1, "resid", True)
    bos = pos[:, 1] == NO_POSITION
    assert meta["keep_special"] is True and bos.sum() > 5 and (ids[bos] == m.specials.cls).all()
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(rows, want_rows, atol=1e-5, rtol=1e-5)
    _, plain, plain_ids, _ = harvests["llama"]  # document tokens: the same rows as without it
    n = int((~bos).sum())
    np.testing.assert_array_equal(ids[~bos], plain_ids[:n])
    np.testing.assert_allclose(rows[~bos], plain[:n], atol=1e-5)


def _folder(tmp_path, name, drop=(), model_type=None):
    """A copy of the llama folder without some files, or with another model_type."""
    out = tmp_path / name
    shutil.copytree(LLAMA, out, ignore=shutil.ignore_patterns(*drop))
    if model_type:
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return out


def test_bad_input_is_one_line(tmp_path, corpus):
    line = one_error_line(sae_jax_cli("harvest", tmp_path / "d", "--model", LLAMA, "--layer", 3,
                                      "--corpus", corpus, "--quiet"))
    assert "layer must be in 0..2 for this 3-layer llama model, got 3" in line
    cases = [
        ({"model": str(tmp_path / "nowhere")}, "unknown model .*no such folder"),
        ({"model": str(_folder(tmp_path, "bert", model_type="bert"))},
         "bert/config.json is not all-MiniLM-L6-v2"),  # a BERT folder is read as MiniLM
        ({"model": str(_folder(tmp_path, "noconfig", drop=["config.json"]))}, "no config.json"),
        ({"model": str(_folder(tmp_path, "noweights", drop=["*.safetensors*"]))},
         "no .safetensors weights"),
        ({"model": str(_folder(tmp_path, "notok", drop=["tokenizer.json"]))}, "no tokenizer.json"),
        ({"model": str(LLAMA), "layer": -1}, "layer must be in 0..2"),
        ({"model": str(LLAMA), "seq_len": 65}, "seq_len must be in 2..64"),
        ({"model": str(LLAMA), "site": "mlp"}, "site must be one of"),
        ({"model": str(LLAMA), "site": "attn_out", "pair": "mlp"}, "exclude each"),
        ({"model": str(LLAMA), "model_dtype": "float16"}, "model_dtype must be one of"),
        ({"site": "resid"}, "--site is for causal LMs"),
        ({"model_dtype": "bfloat16"}, "--model-dtype is for causal LMs"),
        ({"model": str(LLAMA), "mesh": "data:3"}, "needs 3 devices"),
    ]
    for kwargs, match in cases:
        with pytest.raises(UserError, match=match):
            run_harvest(tmp_path / "d", **{"max_tokens": 10, "seq_len": SEQ_LEN, "layer": 1,
                                           "corpus": str(corpus), "progress": False, **kwargs})
        assert not (tmp_path / "d").exists(), kwargs
