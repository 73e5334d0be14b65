"""Multi-source harvests (`sae_jax.lm.harvest_sources`): two models on the same tokens (the
packaged MiniLM and a perturbed copy written here), several layers of one model, and the
cross-layer transcoder store; each compared with the single harvests it must equal."""

import shutil

import numpy as np
import pytest
from conftest import CAUSAL_FIXTURES, json_result, sae_jax_cli

from sae_jax.data.store import open_store
from sae_jax.errors import UserError
from sae_jax.lm import minilm
from sae_jax.lm.harvest import run_harvest
from sae_jax.rundir import read_data_stats

COMMON = {"seq_len": 16, "max_tokens": 60, "batch_size": 8, "progress": False}
TEXT = ("The model reads a token and writes a vector into the stream.\n\n"
        "Every head attends to what came before it, and the autoencoder finds features.\n\n"
        "def main(): return 42 if the answer is known else None\n\n"
        "A crosscoder trains one dictionary on two models at once, side by side.\n")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A text corpus, and a MiniLM folder whose block-1 MLP output weight is perturbed."""
    from safetensors.numpy import load_file, save_file

    tmp = tmp_path_factory.mktemp("sources")
    (tmp / "corpus.txt").write_text(TEXT)
    tuned, src = tmp / "tuned", minilm.model_dir()
    tuned.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, tuned / name)
    tensors = load_file(str(src / "model.safetensors"))
    key = "encoder.layer.0.output.dense.weight"
    noise = np.random.default_rng(0).standard_normal(tensors[key].shape).astype(np.float32)
    tensors[key] = tensors[key] + np.float32(0.05) * noise
    save_file(tensors, str(tuned / "model.safetensors"))
    return tmp, tmp / "corpus.txt", tuned


@pytest.fixture(scope="module")
def one(folders):
    """The packaged MiniLM's layer-2 store: what every multi-source store is compared to."""
    tmp, corpus, _ = folders
    run_harvest(tmp / "one", layer=2, corpus=str(corpus), **COMMON)
    return open_store(tmp / "one")


def _rows(path):
    return open_store(path).rows.read().result()


def test_two_models_on_the_same_tokens(folders, one):
    tmp, corpus, tuned = folders
    proc = sae_jax_cli("harvest", tmp / "two", "--model", "minilm", "--model", tuned,
                       "--names", "base,tuned", "--layer", 2, "--corpus", corpus,
                       "--seq-len", 16, "--max-tokens", 60)  # progress bar on
    meta = json_result(proc)
    assert "tok/s" in proc.stderr
    two = open_store(tmp / "two")
    rows, ref = two.rows.read().result(), one.rows.read().result()
    assert rows.shape == (len(ref), 768) and meta["d_in"] == 768
    assert np.array_equal(rows[:, :384], ref)  # source A is the single harvest, bitwise
    assert np.abs(rows[:, 384:] - ref).max() > 0.1  # source B's block 1 was changed
    for what in ("token_ids", "positions"):
        assert np.array_equal(getattr(two, what).read().result(),
                              getattr(one, what).read().result())
    base, other = two.sources
    assert (base["name"], other["name"], base["d"], other["d"]) == ("base", "tuned", 384, 384)
    assert base["layer"] == other["layer"] == 2 and base["site"] == other["site"] == "resid"
    assert base["model"] == "all-MiniLM-L6-v2" and other["path"] == str(tuned.resolve())
    assert len(base["hash"]) == len(other["hash"]) == 64 and base["hash"] != other["hash"]


def test_models_of_different_vocabularies_are_refused_before_writing(folders):
    tmp, corpus, _ = folders
    with pytest.raises(UserError, match="different tokenizers"):
        run_harvest(tmp / "mixed", model=["minilm", CAUSAL_FIXTURES / "llama"], layer=1,
                    corpus=str(corpus), **COMMON)
    assert not (tmp / "mixed").exists()
    with pytest.raises(UserError, match="take one model"):
        run_harvest(tmp / "mixed", model=["minilm", "minilm"], layers=[1, 2], **COMMON)


def test_several_layers_and_the_cross_layer_transcoder_store(folders, one):
    tmp, corpus, _ = folders
    run_harvest(tmp / "layers", layers=[1, 2], corpus=str(corpus), **COMMON)
    store, resid = open_store(tmp / "layers"), _rows(tmp / "layers")
    assert np.array_equal(resid[:, 384:], one.rows.read().result())
    assert [s["name"] for s in store.sources] == ["layer1", "layer2"]
    assert store.meta["layers"] == [1, 2] and "layer" not in store.meta

    run_harvest(tmp / "clt", layers=[1, 2], pair="mlp", corpus=str(corpus), **COMMON)
    run_harvest(tmp / "pair2", layer=2, pair="mlp", corpus=str(corpus), **COMMON)
    clt, pair2 = _rows(tmp / "clt"), _rows(tmp / "pair2")
    in1, in2, out1, out2 = np.split(clt, 4, axis=1)
    assert np.array_equal(np.concatenate([in2, out2], 1), pair2)
    # block 1's output is LayerNorm(MLP input + MLP output): the stream after layer 1
    ln = minilm.load_params()["layers"][0]["ln_mlp"]
    v = (in1 + out1).astype(np.float64)
    v = (v - v.mean(1, keepdims=True)) / np.sqrt(v.var(1, keepdims=True) + minilm.LN_EPS)
    np.testing.assert_allclose(v * ln["scale"] + ln["bias"], resid[:, :384], atol=2e-4)
    store = open_store(tmp / "clt")
    assert store.pair == (768, 768) and store.meta["pair"]["site"] == "mlp"
    assert store.meta["layers"] == [1, 2]
    assert [(s["name"], s["site"], s["layer"], s["d"]) for s in store.sources] == [
        ("mlp_in.1", "mlp_in", 1, 384), ("mlp_in.2", "mlp_in", 2, 384),
        ("mlp_out.1", "mlp_out", 1, 384), ("mlp_out.2", "mlp_out", 2, 384)]
    stats = read_data_stats(store.span(), 768, 768)  # one scale per layer, input and target
    assert len(set(stats.input_scale)) == len(set(stats.target_scale)) == 2


def test_a_causal_lms_mlp_pairs_of_several_layers_come_in_row_order():
    """`--pair mlp --layers` on a causal LM (the tiny Llama, d = 32): its activation
    function, one pass, gives every MLP input, then every MLP output."""
    import jax

    from sae_jax.lm import causal
    from sae_jax.lm.harvest_sources import layers_plan

    folder = CAUSAL_FIXTURES / "llama"
    meta, width, load = layers_plan(str(folder), [0, 2], None, "mlp", 8, False, 10)
    source, sources = load(None, None)
    ids = np.random.default_rng(0).integers(3, 200, (2, 8)).astype(np.int32)
    got = np.asarray(jax.jit(source.activations)(ids, np.ones_like(ids)))
    m = causal.load(folder)
    (in0, out0), (in2, out2) = (np.split(m.activations(ids, layer, "mlp"), 2, -1)
                                for layer in (0, 2))
    np.testing.assert_allclose(got, np.concatenate([in0, in2, out0, out2], -1), rtol=1e-5,
                               atol=1e-5)
    assert width == got.shape[-1] == sum(s["d"] for s in sources) == 128
    assert len({s["hash"] for s in sources}) == 1 and meta["pair"]["d_in"] == 64
