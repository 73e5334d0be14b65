"""Steering generation and the analysis commands on causal-LM runs: a tiny random-weight
Llama harvested and trained through the CLI, then steered (the "before" text is the model's
own greedy continuation, the clamp is `clamp_feature` at every steered position, a zero-norm
push changes nothing, the random control pushes elsewhere), its dashboard decoded with the
Llama tokenizer, its SAELens export naming the TransformerLens hook, and the MiniLM-only
commands refusing it in one line; plus every command end to end on Gemma 2."""

import argparse
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CAUSAL_FIXTURES, json_result, one_error_line, sae_jax_cli
from test_dashboard import _browse
from test_loss_recovered import check_arithmetic, write_corpus

from sae_jax.analysis import generation, intervene, steer
from sae_jax.errors import UserError
from sae_jax.saelens.export import llm_metadata

LLAMA, GEMMA2 = CAUSAL_FIXTURES / "llama", CAUSAL_FIXTURES / "gemma2"
PROMPT = "def add(a, b):"
N = 6  # tokens generated
N_CATALOG = 16  # features in the dashboard's catalog


def _harvest(store, folder, layer: int, site: str, tokens: int):
    json_result(sae_jax_cli("harvest", store, "--model", folder, "--layer", layer, "--site",
                            site, "--max-tokens", tokens, "--seq-len", 32, "--quiet"))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """(store, run, SAE, model): Llama layer 1 resid, 3000 tokens, a 120-step TopK SAE, all
    through the CLI."""
    from sae_jax.lm import causal
    from sae_jax.sae import load

    base = tmp_path_factory.mktemp("llama")
    store, run = base / "store", base / "run"
    _harvest(store, LLAMA, 1, "resid", 3000)
    json_result(sae_jax_cli("train", store, run, "arch=topk", "width=64", "k=4", "steps=120",
                            "batch_size=128", "--quiet"))
    return store, run, load(run), causal.load(LLAMA)


def _busiest_feature(sae, store, among: int) -> int:
    """The feature of 0..among-1 that fires most on the held-out rows (one the dashboard's
    `--features among` catalog holds, so steer finds its max activation there)."""
    from sae_jax.data.store import open_store

    heldout = open_store(store).split(sae.config.holdout)[1]
    f = np.asarray(sae.encode(heldout.read(0, len(heldout))))[:, :among]
    return int(np.argmax((f > 0).sum(0)))


def _steer_cli(*argv) -> dict:
    parser = argparse.ArgumentParser()
    steer.add_arguments(parser)
    return steer.run(parser.parse_args([str(a) for a in argv]))


def clamp_after_bos(h, sae, feature, value):
    """An independent steering hook: `clamp_feature` at every position but BOS."""
    mask = jnp.broadcast_to(jnp.arange(h.shape[1])[None, :] >= 1, h.shape[:2])
    return intervene.clamp_feature(sae, h, feature, value, mask)


def test_dashboard_and_export_on_a_causal_run(llama_run, tmp_path):
    """First in the module: the run's catalog it writes is what steer reads next."""
    from sae_jax.data.store import open_store
    from sae_jax.lm.hooks import store_tokenizer

    store, run, _, model = llama_run
    site = json_result(sae_jax_cli("dashboard", run, store, tmp_path / "site", "--features",
                                   N_CATALOG))
    assert (tmp_path / "site" / "index.html").is_file() and site["n_features"] == N_CATALOG
    catalog = json.loads((tmp_path / "site" / "feature_catalog.json").read_text())
    tok, opened = store_tokenizer(open_store(store).meta), open_store(store)
    assert tok.to_str() == model.tokenizer.to_str()
    examples = [ex for f in catalog["features"] for ex in f["top_examples"]]
    assert examples and all(tok.token_to_id(t) is not None for ex in examples
                            for t in ex["tokens"])
    for ex in examples[:5]:  # the highlighted token is the store's token, in Llama's vocab
        stored = int(np.asarray(opened.token_ids[ex["row"]:ex["row"] + 1])[0])
        assert ex["tokens"][ex["highlight_index"]] == tok.id_to_token(stored)
    # The page shows byte-level tokens as text: "Ġ" (a leading space) becomes a space.
    fid = next(f["id"] for f in catalog["features"]
               if any("Ġ" in t for ex in f["top_examples"] for t in ex["tokens"]))
    page = _browse((tmp_path / "site" / "index.html").as_uri() + f"#feature-{fid}", tmp_path,
                   "--dump-dom")
    assert page.returncode == 0 and 'data-ready="1"' in page.stdout, page.stderr[-2000:]
    shown = re.findall(r'<span class="tok[^"]*"[^>]*>([^<]*)</span>', page.stdout)
    assert shown and not any("Ġ" in t for t in shown) and any(t.startswith(" ") for t in shown)

    out = json_result(sae_jax_cli("export", run, tmp_path / "sae"))
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert out["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert {k: cfg["metadata"][k] for k in ("model_name", "context_size", "prepend_bos")} == {
        "model_name": "llama", "context_size": 32, "prepend_bos": True}
    assert "feature_catalog.json" in out["files"]


def test_cli_steers_generation(llama_run):
    store, run, sae, model = llama_run
    feature = _busiest_feature(sae, store, N_CATALOG)
    out = sae_jax_cli("steer", run, "--feature", feature, "--times", 6, "--max-new-tokens", N,
                      "--n-random", 2, PROMPT)
    r = json_result(out)
    assert "before:" in out.stderr and "after:" in out.stderr and "random 2:" in out.stderr
    assert (r["model"], r["layer"], r["site"], r["n_prompts"]) == ("llama", 1, "resid", 1)
    assert r["value"] == pytest.approx(6 * r["max_activation"]) and r["max_activation"] > 0
    tok = model.tokenizer
    for p in r["prompts"]:
        ids = np.asarray([[model.specials.cls, *tok.encode(PROMPT, add_special_tokens=False).ids]])
        t0 = ids.shape[1]
        assert (p["n_prompt_tokens"], p["n_steered"]) == (t0, t0 - 1)  # all but BOS
        # "before" is the model's own greedy continuation; "after" is clamp_feature at every
        # position but BOS, generated with an independent hook.
        assert p["ids_before"] == model.generate(ids, N)[0, t0:].tolist()
        assert p["text_before"] == tok.decode(p["ids_before"])
        args = (sae, jnp.int32(feature), jnp.float32(r["value"]))  # on one device: fine
        hooked = model.generate(ids, N, hook=(1, "resid", clamp_after_bos), hook_args=args)
        assert p["ids_after"] == hooked[0, t0:].tolist()
        # A large clamp moves the first next-token distribution; the random push elsewhere.
        assert p["kl"] > 1e-3 and p["logits_rose"][0]["change"] > 0 > p["logits_fell"][0][
            "change"]
        assert p["activation_after"] > p["activation_before"]
        assert len(p["random"]) == 2 and all(c["kl"] > 0 for c in p["random"])
        for c in p["random"]:
            assert ([x["id"] for x in c["logits_rose"]] != [x["id"] for x in p["logits_rose"]]
                    or c["ids"] != p["ids_after"])
        assert p["random"][0]["ids"] != p["random"][1]["ids"] or \
            p["random"][0]["kl"] != p["random"][1]["kl"]
    json.dumps(r, allow_nan=False)


def test_a_zero_norm_push_changes_nothing(llama_run):
    """With the feature's decoder row zeroed, the clamp (and its same-norm random control)
    adds nothing: every continuation and logit is the unsteered one."""
    _, _, sae, model = llama_run
    zeroed = dataclasses.replace(sae, params={**sae.params,
                                              "W_dec": sae.params["W_dec"].at[5].set(0.0)})
    r = generation.steer_generation(zeroed, model, PROMPT, 5, 50.0, layer=1,
                                    max_new_tokens=N, n_random=1, top=3)
    p = r["prompts"][0]
    assert p["ids_after"] == p["ids_before"] == p["random"][0]["ids"]
    assert p["kl"] == 0.0 and r["random_kl"] == 0.0
    assert all(x["change"] == 0.0 for x in p["logits_rose"] + p["logits_fell"])
    # Sampling is seeded: the same seed gives the same sample.
    a, b = (generation.steer_generation(sae, model, PROMPT, 5, 3.0, layer=1,
                                        max_new_tokens=N, n_random=0, temperature=1.5, seed=7)
            for _ in range(2))
    assert a["prompts"][0]["ids_after"] == b["prompts"][0]["ids_after"]


def test_push_hook_is_clamp_feature_and_leaves_padding_rows_alone(llama_run):
    _, _, sae, _ = llama_run
    h = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 32)), jnp.float32)
    direction = intervene.feature_direction(sae, 3)
    got = jax.jit(generation.push_hook)(h, sae, 3, 2.5, direction[None], 1)
    mask = jnp.zeros((1, 6), bool).at[:, 1:].set(True)
    want = jax.jit(intervene.clamp_feature)(sae, h[:1], 3, 2.5, mask)
    np.testing.assert_allclose(np.asarray(got[:1]), np.asarray(want), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[1:]), np.asarray(h[1:]))


def test_saelens_hook_names():
    base = {"model_path": "/m", "model": "g", "layer": 3, "seq_len": 64, "bos": True}
    assert llm_metadata({**base, "site": "attn_out"})["hook_name"] == "blocks.3.hook_attn_out"
    assert llm_metadata({**base, "site": "mlp_out"})["hook_name"] == "blocks.3.hook_mlp_out"
    pair = llm_metadata({**base, "site": "mlp_out", "pair": {"site": "mlp"}})
    assert (pair["hook_name"], pair["hook_name_out"]) == ("blocks.3.ln2.hook_normalized",
                                                          "blocks.3.hook_mlp_out")
    block = llm_metadata({**base, "pair": {"site": "block"}})
    assert (block["hook_name"], block["hook_name_out"]) == ("blocks.3.hook_resid_pre",
                                                            "blocks.3.hook_resid_post")
    assert llm_metadata({"model": "all-MiniLM-L6-v2", "layer": 3}) == {}


def test_minilm_commands_refuse_a_causal_run(llama_run):
    from sae_jax.analysis.runs import open_model_run

    _, run, _, _ = llama_run
    line = one_error_line(sae_jax_cli("features", run, "hello"))
    assert "features runs on all-MiniLM-L6-v2 stores only" in line and "'llama'" in line
    with pytest.raises(UserError, match="audit runs on all-MiniLM-L6-v2 stores only"):
        open_model_run(run, "audit")
    with pytest.raises(UserError, match="out of range: the SAE has 64 features"):
        _steer_cli(run, "--feature", 64, "--value", 1, "hi")
    with pytest.raises(UserError, match="--layer 2 does not match the run"):
        _steer_cli(run, "--feature", 0, "--value", 1, "--layer", 2, "hi")


def test_gemma2_end_to_end(tmp_path):
    """Every command a user runs, through the CLI, on Gemma 2 (soft-capping, sliding
    windows, post-norms) at its MLP output: harvest, train, eval (loss recovered), dashboard,
    steer (sampled) and export."""
    store, run = tmp_path / "store", tmp_path / "run"
    corpus = write_corpus(tmp_path / "corpus.txt")  # zeroing this site raises the loss there
    json_result(sae_jax_cli("harvest", store, "--model", GEMMA2, "--layer", 1, "--site",
                            "mlp_out", "--max-tokens", 2000, "--seq-len", 32, "--corpus",
                            corpus))
    json_result(sae_jax_cli("train", store, run, "arch=topk", "width=64", "k=4", "steps=60",
                            "batch_size=128"))
    ev = json_result(sae_jax_cli("eval", run, store, "--fidelity-sequences", 8, "--corpus",
                                 corpus))
    lm = ev["lm_loss"]
    assert (lm["site"], lm["layer"]) == ("mlp_out", 1) and ev["loss_recovered"] is not None
    check_arithmetic(lm)
    site = json_result(sae_jax_cli("dashboard", run, store, tmp_path / "site", "--features", 8))
    assert site["n_features"] == 8 and (tmp_path / "site" / "index.html").is_file()
    r = json_result(sae_jax_cli("steer", run, "--feature", 0, "--value", 8,
                                "--max-new-tokens", 4, "--n-random", 1, "--temperature", 0.8,
                                PROMPT))
    p = r["prompts"][0]
    assert (r["model"], r["site"], r["temperature"]) == ("gemma2", "mlp_out", 0.8)
    assert (len(p["ids_before"]), len(p["ids_after"]), len(p["random"])) == (4, 4, 1)
    assert p["n_steered"] == p["n_prompt_tokens"] - 1 and p["kl"] > 0
    out = json_result(sae_jax_cli("export", run, tmp_path / "sae"))
    assert out["hook_name"] == "blocks.1.hook_mlp_out"
