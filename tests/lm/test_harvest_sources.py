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


def _rows(path):
    return open_store(path).rows.read().result()


def test_two_models_on_the_same_tokens(folders):
    tmp, corpus, tuned = folders
    proc = sae_jax_cli("harvest", tmp / "two", "--model", "minilm", "--model", tuned,
                       "--names", "base,tuned", "--layer", 2, "--corpus", corpus,
                       "--seq-len", 16, "--max-tokens", 60)  # progress bar on
    meta = json_result(proc)
    assert "tok/s" in proc.stderr
    run_harvest(tmp / "one", layer=2, corpus=str(corpus), **COMMON)
    two, one = open_store(tmp / "two"), open_store(tmp / "one")
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


def test_several_layers_and_the_cross_layer_transcoder_store(folders):
    tmp, corpus, tuned = folders
    run_harvest(tmp / "layers", model=str(tuned), layers=[0, 2], corpus=str(corpus), **COMMON)
    store = open_store(tmp / "layers")
    two = _rows(tmp / "two")  # tuned at layer 2 is its second source
    assert np.array_equal(_rows(tmp / "layers")[:, 384:], two[:, 384:])
    assert [s["name"] for s in store.sources] == ["layer0", "layer2"]
    assert store.meta["layers"] == [0, 2] and "layer" not in store.meta

    run_harvest(tmp / "clt", layers=[1, 3], pair="mlp", corpus=str(corpus), **COMMON)
    pairs = []
    for layer in (1, 3):
        run_harvest(tmp / f"pair{layer}", layer=layer, pair="mlp", corpus=str(corpus),
                    **COMMON)
        pairs.append(_rows(tmp / f"pair{layer}"))
    (in1, out1), (in3, out3) = ((p[:, :384], p[:, 384:]) for p in pairs)
    assert np.array_equal(_rows(tmp / "clt"), np.concatenate([in1, in3, out1, out3], 1))
    clt = open_store(tmp / "clt")
    assert clt.pair == (768, 768) and clt.meta["pair"]["site"] == "mlp"
    assert clt.meta["layers"] == [1, 3]
    assert [(s["name"], s["site"], s["layer"], s["d"]) for s in clt.sources] == [
        ("mlp_in.1", "mlp_in", 1, 384), ("mlp_in.3", "mlp_in", 3, 384),
        ("mlp_out.1", "mlp_out", 1, 384), ("mlp_out.3", "mlp_out", 3, 384)]
