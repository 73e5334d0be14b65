"""The golden causal-LM fixtures are complete and readable without torch.

`tests/fixtures/make_causal_golden.py` wrote them once with transformers; the JAX ports' parity
tests compare against them, so a broken or incomplete folder must fail here first, with the
repo's own safetensors reader and the `tokenizers` library only.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from sae_jax.data.safetensors_io import read_all

CAUSAL = Path(__file__).parents[1] / "fixtures" / "causal"
FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
VOCAB, SEQ, D = 320, 24, 32


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a single-file or sharded (index.json weight_map) checkpoint."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return read_all(folder / "model.safetensors")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    weights = {}
    for shard in shards:
        weights.update(read_all(folder / shard))
    return weights


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_folder_is_complete(family):
    folder = CAUSAL / family
    config = json.loads((folder / "config.json").read_text())
    weights = load_weights(folder)
    assert all(w.dtype == np.float32 for w in weights.values())
    embed = weights["transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"]
    assert embed.shape == (VOCAB, D) == (config["vocab_size"], D)
    assert ("lm_head.weight" in weights) == (not config["tie_word_embeddings"])
    if family == "llama":  # the sharded layout: every index entry lives in its named shard
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(weight_map["weight_map"].values())) > 1
        assert set(weight_map["weight_map"]) == set(weights)

    with np.load(folder / "golden.npz", allow_pickle=False) as z:
        g = {k: z[k] for k in z.files}
    n = config.get("num_hidden_layers", config.get("n_layer"))  # GPT-2 saves n_layer
    assert g["input_ids"].shape == (2, SEQ) and g["input_ids"].dtype == np.int64
    assert g["hidden_states"].shape == (n + 1, 2, SEQ, D)
    assert g["block_outputs"].shape == (n, 2, SEQ, D)
    assert g["logits"].shape == (2, SEQ, VOCAB)
    assert all(np.isfinite(g[k]).all() for k in ("hidden_states", "logits"))
    # hidden_states[l + 1] is block l's output, except the last entry, which has the final norm
    np.testing.assert_array_equal(g["hidden_states"][1:n], g["block_outputs"][: n - 1])
    assert not np.allclose(g["hidden_states"][n], g["block_outputs"][n - 1])
    layer = int(g["hook_layer"])
    np.testing.assert_allclose(
        g["block_outputs"][layer],
        g["hidden_states"][layer] + g["attn_out"] + g["mlp_out"],
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    prompt_len = int(g["prompt_len"])
    np.testing.assert_array_equal(g["generated"][0, :prompt_len], g["input_ids"][0, :prompt_len])
    if g["bos_prepended"]:
        assert (g["input_ids"][:, 0] == config["bos_token_id"]).all()

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() == VOCAB
    text = "def f(x):\n    return x ** 2  # ünïcode ✓"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    meta = json.loads((folder / "golden.json").read_text())
    start = 1 if g["bos_prepended"] else 0
    assert (
        g["input_ids"][0, start:].tolist()
        == tok.encode(meta["sentence"], add_special_tokens=False).ids[: SEQ - start]
    )
    specials = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("bos", "eos", "pad"):
        if specials[f"{key}_token"] is not None:
            assert tok.token_to_id(specials[f"{key}_token"]) == config[f"{key}_token_id"]
