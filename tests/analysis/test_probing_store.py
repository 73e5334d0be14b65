"""The probing and absorption suites on a real tiny MiniLM harvest (made through the
`sae-jax harvest` entry point) and a briefly trained SAE: they run and return sane numbers;
a store they cannot label is skipped with one warning line."""

import types

import jax
import numpy as np
import pytest
from conftest import json_result, sae_jax_cli

from sae_jax.analysis import absorption, probing
from sae_jax.config import make_config
from sae_jax.data.store import open_store
from sae_jax.sae import load
from sae_jax.training.train import train

ARGS = types.SimpleNamespace(corpus=None, probe_rows=4000)


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probing")
    json_result(sae_jax_cli("harvest", tmp / "store", "--layer", 3, "--max-tokens", 12000,
                            "--seq-len", 64))
    cfg = make_config(arch="topk", width=256, k=8, steps=60, batch_size=256, holdout=0.4)
    train(cfg, tmp / "store", tmp / "run", progress=False, devices=jax.devices()[:1])
    return open_store(tmp / "store"), load(tmp / "run")


def test_probing_suite_on_a_minilm_store(harvested):
    store, sae = harvested
    result = probing.suite(sae, store, ARGS)
    m = result["metrics"]
    assert set(m) == {"probe_acc_k1", "probe_acc_k2", "probe_acc_k5", "probe_acc_k20",
                      "probe_acc_raw"} and all(result["higher_is_better"].values())
    tasks = result["detail"]["tasks"]
    assert {"token_type=NAME", "token_type=OP", "prose=docstring_or_comment"} <= set(tasks)
    for r in tasks.values():
        assert all(0.3 <= r[k] <= 1.0 for k in ("k1", "k2", "k5", "k20", "raw"))
        assert r["n_train"] >= 40 and r["n_test"] >= 40 and len(r["latents"]) == 20
    # the residual stream knows a token's Python type far above chance
    assert m["probe_acc_raw"] > 0.75 and 0.5 < m["probe_acc_k20"] <= 1.0
    assert result["detail"]["corpus"].startswith("python-stdlib")


def test_absorption_suite_on_a_minilm_store(harvested):
    store, sae = harvested
    result = absorption.suite(sae, store, ARGS)
    assert result["higher_is_better"] == {}  # no margin over a random SAE: it scores 0
    assert set(result["metrics"]) == {"absorption_rate", "absorption_full_rate"}
    letters = result["detail"]["letters"]
    assert letters and all(0 <= e["probe_f1"] <= 1 for e in letters.values())
    scored = [e for e in letters.values() if "absorption_rate" in e]
    assert len(scored) == result["detail"]["n_letters_scored"]
    for e in scored:
        assert 0 <= e["absorption_rate"] <= 1 and 0 <= e["absorption_full_rate"] <= 1
        assert e["probe_f1"] > absorption.MIN_PROBE_F1 and e["main_latents"]
    m = result["metrics"]
    if scored:
        assert m["absorption_rate"] == pytest.approx(np.mean([e["absorption_rate"]
                                                              for e in scored]))
    else:
        assert m == {"absorption_rate": None, "absorption_full_rate": None}


def test_a_store_without_a_corpus_is_skipped_with_one_warning(harvested, synthetic_store,
                                                              tmp_path, capsys):
    store, sae = harvested
    other = tmp_path / "other.txt"
    other.write_text("some other text\n")
    wrong = types.SimpleNamespace(corpus=[str(other)], probe_rows=4000)
    for suite in (probing.suite, absorption.suite):
        result = suite(sae, store, wrong)
        assert all(v is None for v in result["metrics"].values())
        assert "cannot rebuild the corpus" in result["detail"]["skipped"]
    imported = open_store(synthetic_store)
    result = probing.suite(sae, imported, ARGS)
    assert "needs a store harvested with sae-jax harvest" in result["detail"]["skipped"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(ln.startswith("sae-jax: warning: ") for ln in lines)
