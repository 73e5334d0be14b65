"""Steering: the clamp keeps the SAE error term (clamping to the current value changes
nothing), moves a toy model's output along the feature's known direction by exactly the
expected amount, and runs end to end on a tiny real MiniLM run from the command line."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import json_result, one_error_line, sae_jax_cli

from sae_jax import saes
from sae_jax.analysis import intervene, steer
from sae_jax.config import make_config
from sae_jax.errors import UserError
from sae_jax.lm.hooks import special_ids, steered_positions
from sae_jax.sae import SAE

TEXTS = ["def add(a, b): return a + b", "The cat sat on the mat."]


# ----------------------------------------------------------------------------------------
# The pure intervention


def _random_sae(arch: str, d: int = 16, width: int = 32, scale: float = 1.7) -> SAE:
    cfg = make_config(arch=arch, width=width, k=4, compute_dtype="float32")
    p = saes.init(jax.random.key(0), cfg, d)
    p = {**p, "b_enc": jnp.full((width,), 0.1, jnp.float32),
         "b_dec": jax.random.normal(jax.random.key(2), (d,)) * 0.1}
    return SAE(cfg, p, scale, 0)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_clamping_to_the_current_value_changes_nothing(arch):
    sae = _random_sae(arch)
    h = jax.random.normal(jax.random.key(1), (3, 7, 16))
    mask = jax.random.bernoulli(jax.random.key(3), 0.7, (3, 7))

    @jax.jit
    def clamp_to_current(sae, i):  # the SAE and the feature index may be traced
        current = intervene.feature_activation(sae, h, i)
        return intervene.clamp_feature(sae, h, i, current, mask)

    for i in range(sae.width):
        np.testing.assert_array_equal(np.asarray(clamp_to_current(sae, i)), np.asarray(h))


def test_clamp_is_decode_of_the_changed_code_plus_the_error_term():
    sae = _random_sae("relu")
    h = jax.random.normal(jax.random.key(1), (2, 5, 16))
    mask = jnp.ones((2, 5), bool).at[1, 3].set(False)
    i, v = 7, 2.5
    f = np.asarray(sae.encode(h))
    f_new = f.copy()
    f_new[..., i] = v
    expected = np.array(sae.decode(f_new) + (h - sae.decode(f)))
    expected[1, 3] = h[1, 3]  # outside the mask
    got = intervene.clamp_feature(sae, h, i, v, mask)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(intervene.feature_activation(sae, h, i)),
                               f[..., i], atol=1e-6)


def test_functions_trace_under_jit():
    sae = _random_sae("topk")
    h = jax.random.normal(jax.random.key(1), (2, 5, 16))
    mask = jnp.ones((2, 5), bool)
    fn = jax.jit(lambda s, h, v: intervene.clamp_feature(s, h, 3, v, mask))
    eager = intervene.clamp_feature(sae, h, 3, 4.0, mask)
    np.testing.assert_allclose(np.asarray(fn(sae, h, 4.0)), np.asarray(eager), atol=1e-6)


# ----------------------------------------------------------------------------------------
# A toy model whose output is a linear readout of the hooked stream


D, SCALE = 8, 2.0
WORDS = ["fire", "water", "stone", "tree", "sky"]


class ToyModel:
    """Words -> fixed vectors (the 'layer 1' stream) -> mean over tokens (the 'embedding').
    `embed(..., unit=False)` returns the raw readout, so shifts can be checked exactly."""

    tokenizer = None

    def __init__(self):
        rng = np.random.default_rng(0)
        vecs = rng.standard_normal((len(WORDS), D)).astype(np.float32)
        vecs[:, 0] = 0.0  # no word but "fire" has a component on feature 0's direction
        vecs[0] = 0.0
        vecs[0, 0] = 3.0
        self.vecs = jnp.asarray(vecs)

    def tokenize(self, texts):
        toks = [[WORDS.index(w) for w in t.split()] for t in texts]
        length = max(len(t) for t in toks)
        ids = np.zeros((len(texts), length), np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for r, t in enumerate(toks):
            ids[r, :len(t)], mask[r, :len(t)] = t, 1
        return ids, mask

    def hidden_states(self, texts):
        ids, mask = self.tokenize(texts)
        h = self.vecs[ids]
        return np.stack([np.asarray(h), np.asarray(h)]), mask

    def embed(self, texts, replace=None, unit=True):
        ids, mask = self.tokenize(texts)
        h = self.vecs[ids]
        if replace is not None:
            h = replace[1](h)
        m = jnp.asarray(mask, jnp.float32)[..., None]
        out = np.asarray((h * m).sum(1) / m.sum(1))
        return out / np.linalg.norm(out, axis=-1, keepdims=True) if unit else out


def _toy_sae() -> SAE:
    """ReLU features on the standard basis (scaled units): W_enc = W_decᵀ = I, so the encoder
    inverts the decoder and feature 0 reads (and writes) the first coordinate."""
    eye = np.eye(D, dtype=np.float32)
    p = {"W_enc": eye, "b_enc": np.zeros(D, np.float32), "W_dec": eye,
         "b_dec": np.zeros(D, np.float32)}
    return SAE(make_config(arch="relu", width=D, compute_dtype="float32"), p, SCALE, 0)


def _toy_catalog(max_activation: float = 6.0):
    from sae_jax.analysis.catalog import FeatureCatalog

    entry = {"id": 0, "max_activation": max_activation, "label": None,
             "top_tokens": [["fire", 9]],
             "top_examples": [{"tokens": ["fire"]}, {"tokens": ["fire", "fire"]}]}
    return FeatureCatalog({"width": D}, [entry])


def test_toy_output_moves_along_the_feature_direction_by_the_expected_amount():
    model, sae = ToyModel(), _toy_sae()
    texts = ["water stone tree", "fire sky"]
    ids, mask = model.tokenize(texts)
    where = steered_positions(ids, mask, set(), False)
    v = 5.0
    hook = intervene.steering_hook(sae, 0, v, where)
    clean = model.embed(texts, unit=False)
    steered = model.embed(texts, replace=(1, hook), unit=False)
    # f_0 = SCALE * h[0]: 0 on every word but "fire" (3 * SCALE = 6), so the readout (the mean
    # over tokens) moves by mean_t(v - f_0(h_t)) * W_dec[0] / SCALE along e_0 only.
    f0 = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
    shift = ((v - f0) * mask).sum(1) / mask.sum(1) / SCALE
    expected = clean.copy()
    expected[:, 0] += shift
    np.testing.assert_allclose(steered, expected, atol=1e-6)


def test_toy_steer_reports_movement_toward_the_concept():
    model, sae = ToyModel(), _toy_sae()
    texts = ["water stone tree", "sky tree"]
    up = steer.steer(sae, model, texts, 0, times=2.0, layer=1, catalog=_toy_catalog(),
                     n_random=8)
    assert up["value"] == 12.0 and up["max_activation"] == 6.0 and up["label"] == "fire"
    assert up["activation_before"] == 0.0
    assert up["activation_after"] == pytest.approx(12.0)  # the encoder inverts the decoder
    # The concept ("fire" contexts) is e_0; pushing e_0 raises the cosine to it, far more
    # than a random push of the same size does.
    assert up["concept_cos_before"] == pytest.approx(0.0, abs=1e-6)
    assert up["concept_cos_after"] > 0.5
    assert up["concept_cos_change"] > 5 * abs(up["random_concept_cos_change"])
    assert up["embedding_change"] > 0 and up["random_embedding_change"] > 0
    # Negative multiples push the other way.
    down = steer.steer(sae, model, texts, 0, times=-2.0, layer=1, catalog=_toy_catalog())
    assert down["value"] == -12.0
    assert down["concept_cos_change"] == pytest.approx(-up["concept_cos_change"], abs=1e-6)
    assert down["activation_after"] == 0.0  # a ReLU feature cannot read back negative
    # Clamping to the current value (0 on these words) changes nothing.
    same = steer.steer(sae, model, texts, 0, value=0.0, layer=1, catalog=_toy_catalog())
    assert same["embedding_change"] == pytest.approx(0.0, abs=1e-9)
    assert same["concept_cos_change"] == pytest.approx(0.0, abs=1e-9)


def test_steer_rejects_bad_requests():
    model, sae = ToyModel(), _toy_sae()
    with pytest.raises(UserError, match="out of range"):
        steer.steer(sae, model, ["fire"], D, value=1.0, layer=1)
    with pytest.raises(UserError, match="exactly one"):
        steer.steer(sae, model, ["fire"], 0, layer=1)
    with pytest.raises(UserError, match="exactly one"):
        steer.steer(sae, model, ["fire"], 0, value=1.0, times=2.0, layer=1)
    with pytest.raises(UserError, match="needs the feature's max activation"):
        steer.steer(sae, model, ["fire"], 0, times=2.0, layer=1)
    with pytest.raises(UserError, match="never fired"):
        steer.steer(sae, model, ["fire"], 0, times=2.0, layer=1, catalog=_toy_catalog(0.0))
    with pytest.raises(UserError, match="no entry for feature 3"):
        steer.steer(sae, model, ["fire"], 3, value=1.0, layer=1, catalog=_toy_catalog())
    with pytest.raises(UserError, match="at least one text"):
        steer.steer(sae, model, [], 0, value=1.0, layer=1)
    with pytest.raises(UserError, match="layer must be in 0..1"):
        steer.steer(sae, model, ["fire"], 0, value=1.0, layer=2)
    transcoder = SAE(make_config(arch="relu", width=D, transcoder=True), sae.params, 1.0, 0)
    with pytest.raises(UserError, match="transcoder"):
        steer.steer(transcoder, model, ["fire"], 0, value=1.0, layer=1)


# ----------------------------------------------------------------------------------------
# A tiny real run on MiniLM


def tiny_minilm_run(tmp_path_factory):
    """(store dir, run dir): 3000 tokens of MiniLM layer 3 and a 30-step TopK SAE on them,
    built once per session (test_features reuses it) and with no feature catalog."""
    base = tmp_path_factory.getbasetemp() / "tiny_minilm_run"
    done = base / "done"
    if not done.exists():
        from sae_jax.lm.harvest import run_harvest
        from sae_jax.training.train import train

        run_harvest(base / "store", layer=3, max_tokens=3000, seq_len=32, progress=False)
        cfg = make_config(arch="topk", width=64, k=4, steps=30, batch_size=128)
        train(cfg, base / "store", base / "run", progress=False, devices=jax.devices()[:1])
        done.touch()
    return base / "store", base / "run"


@pytest.fixture(scope="module")
def minilm_case(tmp_path_factory, params, tokenizer):
    from sae_jax.lm import minilm
    from sae_jax.sae import load

    store, run = tiny_minilm_run(tmp_path_factory)
    return minilm.MiniLM(params, tokenizer), load(run), run


def test_minilm_clamp_to_current_activation_keeps_the_embedding(minilm_case):
    model, sae, _ = minilm_case
    ids, mask = model.tokenize(TEXTS)
    where = jnp.asarray(steered_positions(ids, mask, special_ids(model.tokenizer), False))
    assert not where[:, 0].any() and int(where.sum()) == int(mask.sum()) - 2 * len(TEXTS)
    clean = model.embed(TEXTS)
    for i in (0, 5):
        def keep(h, i=i):
            f_i = intervene.feature_activation(sae, h, i)
            return intervene.clamp_feature(sae, h, i, f_i, where)

        np.testing.assert_allclose(model.embed(TEXTS, replace=(3, keep)), clean, atol=1e-6)
    # Through `steer`: a feature silent on every steered token, clamped to 0.
    states, _ = model.hidden_states(TEXTS)
    f = np.asarray(sae.encode(states[3]))[np.asarray(where)]
    silent = int(np.flatnonzero(f.max(0) == 0)[0])
    r = steer.steer(sae, model, TEXTS, silent, value=0.0, layer=3, n_random=1)
    assert r["embedding_change"] < 1e-6 and r["activation_before"] == 0.0
    assert r["concept_cos_before"] is None  # no catalog given


def _steer_cli(*argv) -> dict:
    parser = argparse.ArgumentParser()
    steer.add_arguments(parser)
    return steer.run(parser.parse_args([str(a) for a in argv]))


def test_cli_builds_a_catalog_entry_and_steers_both_ways(minilm_case):
    _, sae, run = minilm_case
    busy = _busiest_feature(sae, run)
    fired = steer.run_catalog(run, sae, _store(run), busy).feature(busy)
    assert fired["count"] > 0
    out = sae_jax_cli("steer", run, "--feature", busy, "--times", 3, "--n-reference", 16,
                  "--n-random", 2, *TEXTS)
    r, err = json_result(out), out.stderr
    assert "scanning the held-out rows" in err and "cos to concept" in err
    assert "nearest before" in err and "nearest after" in err
    assert r["value"] == pytest.approx(3 * fired["max_activation"])
    assert r["layer"] == 3 and r["n_texts"] == 2 and r["n_reference"] == 16
    assert r["embedding_change"] > 1e-4 and r["concept_cos_after"] is not None
    assert len(r["texts"][0]["nearest_before"]) == 3
    assert r["n_steered"] == sum(t["n_steered"] for t in r["texts"]) > 0
    assert (run / steer.REFERENCE_CACHE).is_file()
    json.dumps(r)  # the CLI prints it as the last stdout line
    neg = _steer_cli(run, "--feature", busy, "--times", -2, "--n-reference", 16, "--n-random", 2,
                     *TEXTS)
    assert neg["value"] == pytest.approx(-2 * fired["max_activation"])
    assert neg["activation_after"] == 0.0  # TopK activations are ReLUs
    assert neg["embedding_change"] > 1e-4
    assert neg["texts"][0]["nearest_before"] == r["texts"][0]["nearest_before"]  # cached


def _busiest_feature(sae, run) -> int:
    """The feature that fires most often on the held-out rows (so it has a max activation)."""
    heldout = _store(run).split(sae.config.holdout)[1]
    f = np.asarray(sae.encode(heldout.read(0, len(heldout))))
    return int(np.argmax((f > 0).sum(0)))


def _store(run):
    from sae_jax.data.store import open_store
    from sae_jax.rundir import read_run

    return open_store(read_run(run).data_dir)


def test_cli_reads_the_runs_catalog(minilm_case, tmp_path):
    import shutil

    from sae_jax.analysis.catalog import read_catalog, write_catalog

    _, sae, run = minilm_case
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    catalog = steer.run_catalog(run, sae, _store(run), 2)
    catalog.features[0].update(max_activation=1.25, label="my label")
    write_catalog(catalog, copy)
    assert read_catalog(copy).feature(2)["label"] == "my label"
    r = _steer_cli(copy, "--feature", 2, "--times", 2, "--n-reference", 0, "--n-random", 0,
                   TEXTS[0])
    assert r["value"] == 2.5 and r["label"] == "my label" and r["n_reference"] == 0
    assert "nearest_before" not in r["texts"][0]
    catalog.features[0].update(max_activation=0.0)
    write_catalog(catalog, copy)
    with pytest.raises(UserError, match="never fired"):
        _steer_cli(copy, "--feature", 2, "--times", 2, TEXTS[0])


def test_cli_errors(minilm_case, synthetic_store, tmp_path):
    from sae_jax.rundir import RunInfo, write_run

    _, sae, run = minilm_case
    assert "out of range: the SAE has 64 features" in one_error_line(
        sae_jax_cli("steer", run, "--feature", 64, "--value", 1, "hello"))
    assert "--layer 4 does not match the run: its SAE reads layer 3" in one_error_line(
        sae_jax_cli("steer", run, "--feature", 0, "--value", 1, "--layer", 4, "hello"))
    with pytest.raises(UserError, match="no run at"):
        _steer_cli(tmp_path / "nothing", "--feature", 0, "--value", 1, "hello")
    with pytest.raises(SystemExit):  # argparse: one of --value / --times is required
        _steer_cli(run, "--feature", 0, "hello")
    other = tmp_path / "synthetic_run"
    write_run(other, RunInfo(sae.config, 32, 1.0, str(synthetic_store)))
    with pytest.raises(UserError, match="steer runs all-MiniLM-L6-v2"):
        _steer_cli(other, "--feature", 0, "--value", 1, "hello")
