"""The JAX all-MiniLM-L6-v2 against a golden fixture from the PyTorch reference stack.

The fixture (`tests/fixtures/minilm_golden.*`) was written once by
`tests/fixtures/make_minilm_golden.py` with torch + sentence-transformers; torch is never imported
here.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from sae_jax.lm import minilm

FIXTURES = Path(__file__).parents[1] / "fixtures"
forward = jax.jit(minilm.forward, static_argnames="replace")


@pytest.fixture(scope="module")
def golden():
    meta = json.loads((FIXTURES / "minilm_golden.json").read_text())
    with np.load(FIXTURES / "minilm_golden.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


@pytest.fixture(scope="module")
def hidden(params, golden):
    _, g = golden
    return np.asarray(forward(params, g["input_ids"], g["attention_mask"]))


def _cosine_distance(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 1.0 - (a * b).sum(-1)


def test_tokenize_matches_reference(tokenizer, golden):
    meta, g = golden
    ids, mask = minilm.tokenize(tokenizer, meta["sentences"], meta["max_len"])
    assert ids.dtype == mask.dtype == np.int32
    np.testing.assert_array_equal(ids, g["input_ids"])
    np.testing.assert_array_equal(mask, g["attention_mask"])


def test_hidden_states_match_reference_per_layer(hidden, golden):
    _, g = golden
    n, length = g["input_ids"].shape
    assert hidden.shape == (minilm.N_LAYERS + 1, n, length, minilm.D_MODEL)
    real = hidden[:, g["attention_mask"].astype(bool)]
    for layer in range(minilm.N_LAYERS + 1):
        np.testing.assert_allclose(
            real[layer], g["hidden_states"][layer], atol=1e-4, rtol=0, err_msg=f"layer {layer}"
        )


def test_embeddings_match_sentence_transformers(params, golden):
    _, g = golden
    emb = np.asarray(jax.jit(minilm.embed)(params, g["input_ids"], g["attention_mask"]))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
    assert _cosine_distance(emb, g["embeddings"]).max() < 1e-5


def test_class_pads_to_longest_and_still_matches(params, tokenizer, golden):
    meta, g = golden
    model = minilm.MiniLM(params, tokenizer, max_len=meta["max_len"])
    states, mask = model.hidden_states(meta["sentences"][:2])
    assert states.shape[2] == mask.shape[1] == 16  # longest of the two is 12 tokens, rounded to 8
    assert _cosine_distance(model.embed(meta["sentences"]), g["embeddings"]).max() < 1e-5


def test_identity_replacement_changes_nothing(params, hidden, golden):
    _, g = golden
    replaced = np.asarray(
        forward(params, g["input_ids"], g["attention_mask"], replace=(3, lambda h: h))
    )
    np.testing.assert_allclose(replaced, hidden, atol=1e-6, rtol=0)


def test_zeroing_a_layer_splices_into_the_stream(params, hidden, golden):
    _, g = golden
    mask = g["attention_mask"]
    replaced = np.asarray(forward(params, g["input_ids"], mask, replace=(3, lambda h: h * 0.0)))
    np.testing.assert_array_equal(replaced[:3], hidden[:3])
    assert not replaced[3].any()
    clean = np.asarray(minilm.mean_pool(hidden[-1], mask))
    zeroed = np.asarray(minilm.mean_pool(replaced[-1], mask))
    assert _cosine_distance(clean, zeroed).min() > 1e-2


def test_replace_index_out_of_range_is_rejected(params, golden):
    _, g = golden
    with pytest.raises(minilm.UserError):
        minilm.forward(params, g["input_ids"], g["attention_mask"], replace=(7, lambda h: h))


def test_forward_can_stop_early(params, hidden, golden):
    _, g = golden
    part = np.asarray(jax.jit(minilm.forward, static_argnames="n_layers")(
        params, g["input_ids"], g["attention_mask"], n_layers=2))
    assert part.shape == (3, *hidden.shape[1:])
    np.testing.assert_allclose(part, hidden[:3], atol=1e-6, rtol=0)
    with pytest.raises(minilm.UserError, match="n_layers"):
        minilm.forward(params, g["input_ids"], g["attention_mask"], n_layers=7)
    with pytest.raises(minilm.UserError, match="replace layer index"):
        minilm.forward(params, g["input_ids"], g["attention_mask"], replace=(3, lambda h: h),
                       n_layers=2)
