"""`sae-jax audit` end to end on a tiny real MiniLM harvest and SAE: the report, the audited
catalog, agreement with `eval`/`fidelity`, the command line, and the dashboard's Audit
section rendered in headless Chromium."""

import json
import re

import numpy as np
import pytest
from conftest import json_result, sae_jax_cli  # noqa: E402

from sae_jax.analysis import audit  # noqa: E402
from sae_jax.analysis.audit_report import AUDIT_FILE, SCORES  # noqa: E402
from sae_jax.errors import UserError  # noqa: E402

SMALL = ["--features", "6", "--windows", "16", "--window", "16", "--contexts", "4",
         "--random", "4", "--sequences", "4", "--explain-rows", "2000"]


@pytest.fixture(scope="module")
def audited(tmp_path_factory, params):  # `params` loads MiniLM once for the session
    import jax

    from sae_jax.analysis.dashboard import write_dashboard
    from sae_jax.config import make_config
    from sae_jax.lm.harvest import run_harvest
    from sae_jax.training.train import train

    tmp = tmp_path_factory.mktemp("audit")
    run_harvest(tmp / "store", layer=3, max_tokens=3000, seq_len=32, progress=False)
    cfg = make_config(arch="topk", width=64, k=4, steps=30, batch_size=128, holdout=0.2)
    train(cfg, tmp / "store", tmp / "run", progress=False, devices=jax.devices()[:1])
    write_dashboard(tmp / "run", tmp / "store", tmp / "site", batch_size=1024)
    out = sae_jax_cli("audit", tmp / "run", tmp / "store", *SMALL, "--dashboard", tmp / "site",
                      "--poison-z", "4.5")
    result = json_result(out)
    assert "audit: random control" in out.stderr
    report = json.loads((tmp / "run" / "audit" / "audit.json").read_text(encoding="utf-8"))
    return tmp, result, report


def test_report_scores_features_and_controls(audited):
    _, result, report = audited
    assert 0 < len(report["features"]) <= 6 and 0 < len(report["random_features"]) <= 6
    assert result["n_features"] == len(report["features"])
    for r in report["features"] + report["random_features"]:
        assert r["n_contexts"] >= 3 and -1 <= r["ablation_r"] <= 1
        assert r["causal"] is not None and 0 <= r["steer_winrate"] <= 1
        assert r["explanatory"] is None or -1 <= r["explanatory"] <= 1
        assert r["explanation"] and r["label"]
    for key in SCORES:
        s = report["summary"][key]
        assert set(s) == {"median", "median_random", "margin", "auc"}
        if s["median"] is not None and s["median_random"] is not None:
            assert s["margin"] == pytest.approx(s["median"] - s["median_random"], abs=1e-3)
        assert result[f"{key}_auc"] == s["auc"]
        counts = report["histograms"][key]["real"]["counts"]
        assert sum(counts) == sum(r[key] is not None for r in report["features"])
    ranked = report["ranked"]["causal"]
    assert ranked["best"][0]["causal"] == max(r["causal"] for r in report["features"])


def test_trained_features_beat_the_random_controls(audited):
    """Steering along a trained feature's decoder row moves MiniLM's output toward what the
    feature detects far more than random same-norm pushes do; a random SAE's do not."""
    _, result, report = audited
    causal = report["summary"]["causal"]
    assert result["causal_auc"] == causal["auc"] >= 0.75, causal
    assert causal["median"] > causal["median_random"] + 1.0, causal
    winrate = report["summary"]["steer_winrate"]
    assert winrate["auc"] >= 0.75 and winrate["median"] > winrate["median_random"], winrate


def test_coverage_agrees_with_eval_and_fidelity(audited):
    from sae_jax.analysis.evaluate import evaluate
    from sae_jax.analysis.fidelity import downstream_fidelity
    from sae_jax.data.store import open_store
    from sae_jax.sae import load

    tmp, result, report = audited
    sae, store = load(tmp / "run"), open_store(tmp / "store")
    cov = report["coverage"]
    assert cov["n_tokens"] == 600
    assert cov["fvu"] == pytest.approx(evaluate(sae, store.split(0.2)[1])["fvu"], rel=1e-4)
    assert result["fvu"] == cov["fvu"] and 0 < cov["fvu"] < 1
    assert len(cov["dark_matter"]) == 20
    errs = [d["value"] for d in cov["dark_matter"]]
    assert errs == sorted(errs, reverse=True)
    fid = downstream_fidelity(sae, store, n_sequences=4, seed=0)
    down = cov["downstream"]
    assert down["per_sequence"]["mean"] == pytest.approx(fid["loss_spliced"], rel=1e-6)
    assert down["fidelity"]["loss_spliced"] == fid["loss_spliced"]
    assert down["worst_sequences"][0]["text"]


def test_report_has_poisoning_flags(audited):
    """The poisoning detector ran over every latent on the explanation rows, with the
    thresholds the `--poison-*` options set; the result line counts its flags."""
    _, result, report = audited
    p = report["poisoning"]
    assert p["thresholds"]["z"] == 4.5 and p["thresholds"]["doc_share"] == 0.9
    assert p["rows"] == report["settings"]["explain_rows"] and p["n_rows"] == 2000
    assert 0 < p["n_scored"] <= report["width"] and p["n_documents"] > 0
    assert result["poisoning_flagged"] == p["n_flagged"] == len(p["flagged_features"])
    for f in p["flagged"]:
        assert set(f) >= {"feature", "score", "reasons", "top_documents", "ngram"}
        assert f["reasons"] and 0 <= f["score"] <= 3
    scores = [f["score"] for f in p["flagged"]]
    assert scores == sorted(scores, reverse=True)


def test_audited_catalog_is_readable(audited):
    from sae_jax.analysis.catalog import read_catalog

    tmp, _, report = audited
    catalog = read_catalog(tmp / "run" / "audit")
    assert [f["id"] for f in catalog.features] == [r["id"] for r in report["features"]]
    first = catalog.features[0]
    assert first["audit"]["causal"] == report["features"][0]["causal"]
    assert first["top_examples"] and catalog.header["audit"] == AUDIT_FILE


def test_audit_section_renders_in_chromium(audited):
    from test_dashboard import _browse, _console_errors

    tmp, result, report = audited
    assert result["dashboard"] == str(tmp / "site" / "audit.js")
    js = (tmp / "site" / "audit.js").read_text(encoding="utf-8")
    assert json.loads(js[len("window.SAE_AUDIT = "):].rstrip().rstrip(";")) == report
    res = _browse((tmp / "site" / "index.html").as_uri(), tmp, "--dump-dom")
    assert res.returncode == 0 and 'data-ready="1"' in res.stdout, res.stderr[-2000:]
    dom = res.stdout
    assert not _console_errors(res.stderr), _console_errors(res.stderr)
    assert '<section id="audit">' in dom and "Dark matter" in dom
    assert len(re.findall(r'<div class="example">', dom)) >= 20
    best = report["ranked"]["explanatory"]["best"][0]["id"]
    assert f'href="#feature-{best}"' in dom
    assert dom.count('class="audit-col"') == 2  # the table's causal/explanatory columns, shown
    fid = report["features"][0]["id"]
    page = _browse((tmp / "site" / "index.html").as_uri() + f"#feature-{fid}", tmp,
                   "--dump-dom")
    assert 'id="feature-audit"' in page.stdout and not _console_errors(page.stderr)


def test_window_starts_cut_documents():
    pos = np.array([[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [1, 0], [1, 1], [1, 3], [1, 4],
                    [1, 5], [2, -1], [2, 0]])
    assert audit.window_starts(pos, 3, min_tokens=2).tolist() == [[0, 3], [3, 5], [5, 7],
                                                                  [7, 10]]


def test_bad_inputs(audited, synthetic_store):
    tmp, _, _ = audited
    with pytest.raises(UserError, match="audit runs all-MiniLM-L6-v2"):
        audit.audit(tmp / "run", synthetic_store)
    with pytest.raises(UserError, match="n_contexts must be at least 3"):
        audit.audit(tmp / "run", n_contexts=2)
    from sae_jax.analysis.dashboard import write_audit_js

    with pytest.raises(UserError, match="not a dashboard site"):
        write_audit_js({}, tmp / "nowhere")
