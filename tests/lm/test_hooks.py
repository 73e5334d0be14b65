"""The LM hook contract: the layer state is the model's own, a padded batched pass equals an
unbatched one, the two position rules agree, and stores the model cannot be re-run for are
refused."""

import itertools

import jax
import numpy as np
import pytest

from sae_jax.data.store import open_store  # noqa: E402
from sae_jax.errors import UserError  # noqa: E402
from sae_jax.lm import hooks, minilm  # noqa: E402
from sae_jax.lm.corpus import sequences, stdlib_corpus  # noqa: E402

TEXTS = ["def add(a, b): return a + b", "The cat sat on the mat.", "import os",
         "x = [i * i for i in range(10)]", "Errors should never pass silently."]


def test_layer_state_and_embedding_from_the_layer(params, tokenizer):
    ids, mask = minilm.tokenize(tokenizer, TEXTS, 16)
    full = np.asarray(minilm.forward(params, ids, mask))
    h = hooks.layer_state(params, ids, mask, layer=2)
    np.testing.assert_allclose(np.asarray(h), full[2], atol=1e-5)
    # The output computed from the layer-2 stream is the model's own embedding.
    np.testing.assert_allclose(np.asarray(hooks.embedding_from(2)(params, h, mask)),
                               np.asarray(minilm.embed(params, ids, mask)), atol=1e-5)
    acts = hooks.minilm_activations(2, params)
    np.testing.assert_allclose(np.asarray(acts(ids, mask)), full[2], atol=1e-5)
    # One tree structure per layer: a jit cache keyed on it hits on the next call.
    assert (jax.tree_util.tree_structure(acts)
            == jax.tree_util.tree_structure(hooks.minilm_activations(2, params)))
    with pytest.raises(UserError, match="layer must be in 0..6"):
        hooks.minilm_activations(7, params)


def test_model_pass_in_padded_batches_equals_one_pass(params, tokenizer):
    ids, mask = minilm.tokenize(tokenizer, TEXTS, 16)
    one = np.asarray(hooks.layer_state(params, ids, mask, layer=1))
    batched = hooks.model_pass(hooks.layer_state, params, ids, mask, size=2, layer=1)
    assert batched.shape == one.shape  # 3 batches of 2, the last one half fill
    np.testing.assert_allclose(batched, one, atol=1e-5)
    emb = hooks.model_pass(minilm.embed, params, ids, mask, size=4)
    np.testing.assert_allclose(emb, np.asarray(minilm.embed(params, ids, mask)), atol=1e-5)


@pytest.mark.parametrize("keep_special", [False, True])
def test_position_rules_agree(tokenizer, keep_special):
    seqs = list(sequences(itertools.islice(stdlib_corpus(), 3), tokenizer, 24))
    ids = np.stack([s.input_ids for s in seqs])
    mask = np.stack([s.attention_mask for s in seqs])
    positions = np.stack([s.positions for s in seqs])
    assert (mask == 0).any()  # the last sequence of a document is padded
    spliced = hooks.spliced_positions(mask, positions, keep_special)
    steered = hooks.steered_positions(ids, mask, hooks.special_ids(tokenizer), keep_special)
    np.testing.assert_array_equal(spliced, steered)
    assert not (spliced & (mask == 0)).any()
    assert spliced[:, 0].all() == keep_special  # [CLS]


def test_stores_the_model_cannot_rerun_are_refused(synthetic_store):
    store = open_store(synthetic_store)
    with pytest.raises(UserError, match=f"steer {hooks.NOT_MODEL_BACKED}"):
        hooks.check_model_store(store, "steer")

    class Transcoder:
        transcoder = True

    with pytest.raises(UserError, match="features needs an SAE on the residual stream"):
        hooks.check_not_transcoder(Transcoder(), "features")
