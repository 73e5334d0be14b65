"""Per-token feature extraction: agrees with `SAE.encode` on the model's own activations,
lists features most active first, pads batches without changing results, and runs from
the command line and the benchmark."""

import argparse
import json

import numpy as np
import pytest
from conftest import json_result, one_error_line, sae_jax_cli  # noqa: E402
from test_steer import minilm_case  # noqa: E402,F401  (the fixture (MiniLM, SAE, run))

from sae_jax.analysis import features  # noqa: E402
from sae_jax.analysis.catalog import FeatureCatalog, labels_from_catalog  # noqa: E402
from sae_jax.errors import UserError  # noqa: E402

TEXTS = ["def add(a, b): return a + b", "The cat sat on the mat.", "import os",
         "x = [i * i for i in range(10)]", "Errors should never pass silently."]
LAYER = 3


def test_top_features_agree_with_encode(minilm_case):
    model, sae, _ = minilm_case
    top = 3
    got = features.extract_features(sae, model, TEXTS, LAYER, top=top)
    states, mask = model.hidden_states(TEXTS)
    f = np.asarray(sae.encode(states[LAYER]))  # (n, L, F)
    ids, _ = model.tokenize(TEXTS)
    for t, result in enumerate(got):
        assert result["text"] == TEXTS[t] and not result["truncated"]
        # Document tokens only: [CLS] (position 0) and [SEP] (the last real one) are skipped.
        positions = [tok["position"] for tok in result["tokens"]]
        assert positions == list(range(1, int(mask[t].sum()) - 1))
        for tok in result["tokens"]:
            p = tok["position"]
            assert tok["token"] == model.tokenizer.id_to_token(int(ids[t, p]))
            acts = [x["activation"] for x in tok["features"]]
            assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
            want = np.argsort(-f[t, p], kind="stable")[:top]
            want = [int(i) for i in want if f[t, p, i] > 0]
            assert sorted(x["id"] for x in tok["features"]) == sorted(want)
            for x in tok["features"]:
                assert x["activation"] == pytest.approx(f[t, p, x["id"]], rel=1e-4, abs=1e-5)
                assert x["label"] is None
    # TopK with k=4: exactly min(top, 4) features fire on every token here.
    assert {len(tok["features"]) for r in got for tok in r["tokens"]} == {top}


def test_batches_threshold_labels_and_truncation(minilm_case):
    model, sae, _ = minilm_case
    whole = features.extract_features(sae, model, TEXTS, LAYER, top=4)
    small_batches = features.extract_features(sae, model, TEXTS, LAYER, top=4, batch_size=2)
    assert [[[x["id"] for x in t["features"]] for t in r["tokens"]] for r in small_batches] \
        == [[[x["id"] for x in t["features"]] for t in r["tokens"]] for r in whole]
    for a, b in zip(small_batches, whole):
        for ta, tb in zip(a["tokens"], b["tokens"]):
            np.testing.assert_allclose([x["activation"] for x in ta["features"]],
                                       [x["activation"] for x in tb["features"]], atol=1e-5)
    acts = np.array([x["activation"] for r in whole for t in r["tokens"] for x in t["features"]])
    cut = float(np.median(acts))
    high = features.extract_features(sae, model, TEXTS, LAYER, top=4, threshold=cut)
    kept = [x["activation"] for r in high for t in r["tokens"] for x in t["features"]]
    assert len(kept) == int((acts > cut).sum()) and min(kept) > cut
    first = whole[0]["tokens"][0]["features"][0]["id"]
    catalog = FeatureCatalog({}, [{"id": first, "label": "my label", "top_tokens": []},
                                  {"id": (first + 1) % sae.width, "label": None,
                                   "top_tokens": [["def", 3], ["class", 2]]}])
    labelled = features.extract_features(sae, model, TEXTS[:1], LAYER, top=4, catalog=catalog)
    feats = labelled[0]["tokens"][0]["features"]
    assert feats[0]["label"] == "my label"
    labels = labels_from_catalog(catalog)
    assert labels[(first + 1) % sae.width] == "def / class"
    long = features.extract_features(sae, model, [" ".join(["word"] * 40)], LAYER, top=2,
                                     max_len=16)
    assert long[0]["truncated"] and len(long[0]["tokens"]) == 14


def test_bad_arguments(minilm_case):
    model, sae, _ = minilm_case
    with pytest.raises(UserError, match="top must be in 1..64"):
        features.extract_features(sae, model, TEXTS, LAYER, top=0)
    with pytest.raises(UserError, match="at least one text"):
        features.extract_features(sae, model, [], LAYER)


def _features_cli(*argv) -> dict:
    parser = argparse.ArgumentParser()
    features.add_arguments(parser)
    return features.run(parser.parse_args([str(a) for a in argv]))


def test_cli(minilm_case, tmp_path, synthetic_store):
    from sae_jax.rundir import RunInfo, write_run

    _, sae, run = minilm_case
    out = sae_jax_cli("features", run, "--top", 2, *TEXTS[:2])
    r, err = json_result(out), out.stderr
    assert "no feature catalog" in err and "[1] 'def add(a, b): return a + b'" in err
    assert r["layer"] == LAYER and not r["labels"] and len(r["texts"]) == 2
    assert r["texts"][0]["tokens"][0]["token"] == "def"
    assert all(len(t["features"]) == 2 for t in r["texts"][1]["tokens"])
    json.dumps(r)
    with pytest.raises(UserError, match="--max-len"):
        _features_cli(run, "--max-len", 2, "hello")
    # The run's SAE reads layer 3: reading layer 5 with it is refused, not silently done.
    err = one_error_line(sae_jax_cli("features", run, "--layer", 5, "hello"))
    assert "--layer 5 does not match the run: its SAE reads layer 3" in err
    assert _features_cli(run, "--layer", 3, "hello")["layer"] == 3
    other = tmp_path / "synthetic_run"
    write_run(other, RunInfo(sae.config, 32, 1.0, str(synthetic_store)))
    with pytest.raises(UserError, match="features runs all-MiniLM-L6-v2"):
        _features_cli(other, "hello")


def test_bench_with_a_fresh_sae(params, tokenizer):
    r = features.bench_feature_extraction(width=128, k=8, layer=1, n_texts=2, seq_len=16,
                                          short_len=8, repeat=2, model_params=params,
                                          tokenizer=tokenizer)
    assert r["features_width"] == 128 and r["features_batch"] == [2, 16]
    assert r["features_latency_ms_per_token"] > 0 and r["features_tokens_per_s"] > 0
    assert r["features_latency_ms"] == pytest.approx(8 * r["features_latency_ms_per_token"])
