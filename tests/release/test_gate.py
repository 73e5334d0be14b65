"""`sae-jax gate`: a bundle passes or fails exactly as its policy says.

Bundles are written here as `sae-jax bundle` lays them out (the contract in
`release.manifest` and `release.gate`): a SAELens export of known params, a catalog, eval
and audit reports, provenance, bill, and the manifest over all of them.
"""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
from conftest import sae_jax_cli

from sae_jax.cli import main
from sae_jax.errors import UserError
from sae_jax.release.gate import gate
from sae_jax.release.manifest import verify_manifest, write_manifest
from sae_jax.release.policy import parse_policy
from sae_jax.saelens import saelens_cfg, saelens_tensors

D_IN, WIDTH = 64, 32
MINILM_EVAL = {"step": 100, "split": "heldout", "fvu": 0.12, "l0": 8.0, "dead_frac": 0.05,
               "fidelity": {"fidelity_recovered": 0.93, "fidelity_recovered_zero": 0.99}}
CAUSAL_EVAL = {"step": 100, "split": "heldout", "fvu": 0.2, "l0": 8.0, "dead_frac": 0.05,
               "lm_loss": {"loss_recovered": 0.81}, "loss_recovered": 0.81}
AUDIT = {"format": "sae_jax audit", "version": 1,
         "summary": {"causal": {"median": 2.1, "median_random": 0.0, "auc": 0.84},
                     "explanatory": {"median": 0.4, "median_random": 0.01, "auc": 0.91}},
         "coverage": {"fvu": 0.12, "no_active_fraction": 0.01},
         "poisoning": {"n_flagged": 2, "flagged_features": [3, 7],  # analysis.poisoning
                       "flagged": [{"feature": 3, "score": 9.5}, {"feature": 7, "score": 6.0}]}}


def decoder(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(WIDTH, D_IN)).astype(np.float32)


def make_bundle(path, w_dec=None, eval_=MINILM_EVAL, audit=AUDIT):
    """A bundle directory with a relu SAE of decoder `w_dec` and the given reports."""
    rng = np.random.default_rng(1)
    w_dec = decoder(0) if w_dec is None else w_dec
    params = {"W_enc": w_dec.T.copy(), "b_enc": np.zeros(WIDTH, np.float32), "W_dec": w_dec,
              "b_dec": rng.normal(size=D_IN).astype(np.float32)}
    (path / "sae").mkdir(parents=True)
    cfg = saelens_cfg("relu", D_IN, WIDTH, 8, {"library": "sae_jax", "arch": "relu"})
    (path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    safetensors.numpy.save_file(saelens_tensors(params, "relu", 1.0),
                                path / "sae" / "sae_weights.safetensors")
    catalog = {"header": {"version": 1}, "features": [
        {"id": i, "label": f"feature {i}", "top_tokens": [[f"tok{i}", 5]]} for i in range(WIDTH)]}
    (path / "catalog.json").write_text(json.dumps(catalog))
    (path / "reports").mkdir()
    for name, report in (("eval", eval_), ("audit", audit)):
        if report is not None:
            (path / "reports" / f"{name}.json").write_text(json.dumps(report))
    (path / "provenance.json").write_text(json.dumps(
        {"model": {"name": "all-MiniLM-L6-v2", "sha256": {"model.safetensors": "ab" * 32}},
         "layer": 3, "site": "resid"}))
    (path / "bill.json").write_text(json.dumps({"steps": 100, "tokens": 51200}))
    write_manifest(path)
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {"minilm": make_bundle(root / "minilm"),
            "causal": make_bundle(root / "causal", eval_=CAUSAL_EVAL),
            "no_audit": make_bundle(root / "no_audit", audit=None),
            "same": make_bundle(root / "same"),
            "other_seed": make_bundle(root / "other_seed", w_dec=decoder(5)),
            "half": make_bundle(root / "half", w_dec=np.concatenate([decoder(0)[:16],
                                                                     decoder(6)[16:]]))}


@pytest.fixture(scope="module")
def crosscoder(tmp_path_factory):
    """A small ReLU crosscoder on two sources of width 8 with 8 shared atoms and 4 only in
    each source (`two_source_data`), and its diff (what the gate's diff check reads)."""
    import jax

    from sae_jax.analysis.diff import diff_run
    from sae_jax.config import make_config
    from sae_jax.data.importers import import_activations
    from sae_jax.data.synthetic import two_source_data
    from sae_jax.training.train import train

    tmp = tmp_path_factory.mktemp("xc")
    rows, _, _ = two_source_data(6000, 8, n_shared=8, n_exclusive=4, seed=3)
    np.save(tmp / "base.npy", rows[:, :8])
    np.save(tmp / "tuned.npy", rows[:, 8:])
    store = import_activations([tmp / "base.npy", tmp / "tuned.npy"], tmp / "store")
    cfg = make_config(arch="crosscoder", width=32, batch_size=256, steps=200, lr=3e-3)
    train(cfg, store.path, tmp / "run", progress=False, devices=jax.devices()[:1])
    return tmp / "run", diff_run(str(tmp / "run"))


def statuses(result) -> dict:
    return {c["check"]: c["status"] for c in result["checks"]}


# (bundle, policy key, value that passes, value that fails, check name)
THRESHOLDS = [
    ("minilm", "min_fidelity", 0.9, 0.95, "fidelity"),
    ("causal", "min_loss_recovered", 0.8, 0.85, "loss_recovered"),
    ("minilm", "max_dark_matter", 0.15, 0.1, "dark_matter"),
    ("minilm", "min_faithfulness_auc", 0.8, 0.85, "faithfulness_auc[causal]"),
    ("minilm", "min_faithfulness_auc_margin", 0.3, 0.4, "faithfulness_auc_margin[causal]"),
    ("minilm", "max_dead_frac", 0.05, 0.04, "dead_frac"),
    ("minilm", "max_poisoning_flags", 2, 1, "poisoning"),
]


@pytest.mark.parametrize("bundle,key,good,bad,check", THRESHOLDS)
def test_each_threshold_passes_and_fails(bundles, bundle, key, good, bad, check):
    ok = gate(bundles[bundle], parse_policy({key: good}))
    assert ok["passed"] and statuses(ok) == {"manifest": "pass", **statuses(ok), check: "pass"}
    no = gate(bundles[bundle], parse_policy({key: bad}))
    assert not no["passed"] and no["failed"] == [check]


def test_faithfulness_checks_every_listed_score(bundles):
    result = gate(bundles["minilm"], parse_policy({"min_faithfulness_auc": 0.88}))
    assert statuses(result) == {"manifest": "pass", "faithfulness_auc[causal]": "fail",
                                "faithfulness_auc[explanatory]": "pass"}
    only = parse_policy({"min_faithfulness_auc": 0.88, "faithfulness_scores": ["explanatory"]})
    assert gate(bundles["minilm"], only)["passed"]


def test_missing_metric_fails_unless_allowed(bundles):
    policy = {"min_loss_recovered": 0.5, "max_dark_matter": 0.5}
    result = gate(bundles["minilm"], parse_policy(policy))  # a MiniLM eval: no loss recovered
    assert result["failed"] == ["loss_recovered"]
    assert result["checks"][1]["reason"].startswith("not measured")
    result = gate(bundles["no_audit"], parse_policy(policy))
    assert result["failed"] == ["loss_recovered", "dark_matter"]
    assert "no reports/audit.json" in result["checks"][2]["reason"]
    allowed = gate(bundles["no_audit"], parse_policy({**policy, "allow_missing": True}))
    assert allowed["passed"]
    assert statuses(allowed) == {"manifest": "pass", "loss_recovered": "skipped",
                                 "dark_matter": "skipped"}


def test_poisoning_flags_pass_once_acknowledged(bundles, tmp_path):
    assert gate(bundles["minilm"], parse_policy({"max_poisoning_flags": 0}))["failed"] == [
        "poisoning"]
    assert gate(bundles["minilm"], parse_policy({"acknowledged_features": [3, 7]}))["passed"]
    one = gate(bundles["minilm"], parse_policy({"acknowledged_features": [3]}))
    assert one["failed"] == ["poisoning"] and "[7]" in one["checks"][1]["reason"]
    unmeasured = make_bundle(tmp_path / "b", audit={k: v for k, v in AUDIT.items()
                                                    if k != "poisoning"})
    result = gate(unmeasured, parse_policy({"max_poisoning_flags": 0}))
    assert result["failed"] == ["poisoning"]
    assert "detector was not run" in result["checks"][1]["reason"]


def test_tampered_bundle_fails_and_nothing_else_is_read(bundles, tmp_path):
    bundle = shutil.copytree(bundles["minilm"], tmp_path / "b")
    assert verify_manifest(bundle) == []
    report = bundle / "reports" / "eval.json"
    data = bytearray(report.read_bytes())
    data[10] ^= 1
    report.write_bytes(bytes(data))
    result = gate(bundle, parse_policy({"min_fidelity": 0.0}))
    assert result["failed"] == ["manifest"] and [c["check"] for c in result["checks"]] == [
        "manifest"]
    assert result["manifest_problems"] == ["reports/eval.json: SHA-256 differs from the manifest"]
    (bundle / "extra.txt").write_text("x")
    (bundle / "bill.json").unlink()
    assert verify_manifest(bundle) == [
        "missing: bill.json", "unlisted: extra.txt",
        "reports/eval.json: SHA-256 differs from the manifest"]
    (bundle / "manifest.json").write_text("{")
    assert gate(bundle, parse_policy({}))["failed"] == ["manifest"]


def test_drift_same_sae_passes_other_seed_fails_and_lists_vanished(bundles):
    policy = parse_policy({"min_drift_pwmcc": 0.99})
    same = gate(bundles["minilm"], policy, baseline=bundles["same"])
    assert same["passed"] and same["drift"]["pwmcc"] == pytest.approx(1.0, abs=1e-5)
    assert same["drift"]["vanished"] == [] and same["drift"]["appeared"] == []
    other = gate(bundles["other_seed"], parse_policy({"min_drift_pwmcc": 0.9}),
                 baseline=bundles["minilm"])
    assert other["failed"] == ["drift_pwmcc"] and other["drift"]["pwmcc"] < 0.5
    assert other["drift"]["vanished"] == list(range(WIDTH))  # random 64-d directions
    # Half the features kept, half replaced: exactly the replaced ones vanish and appear.
    half = gate(bundles["half"], parse_policy({"min_drift_pwmcc": 0.9}),
                baseline=bundles["minilm"])
    assert half["failed"] == ["drift_pwmcc"]
    assert half["drift"]["vanished"] == half["drift"]["appeared"] == list(range(16, WIDTH))
    assert half["drift"]["examples"]["vanished"][0]["label"].startswith("feature ")
    missing = gate(bundles["minilm"], policy)  # no --baseline
    assert missing["failed"] == ["drift_pwmcc"] and "no --baseline" in missing["checks"][1][
        "reason"]


def test_diff_exclusive_fraction_and_listed_shared_latents(bundles, crosscoder):
    run, diff = crosscoder
    c = diff["counts"]
    frac = (c["A-only"] + c["B-only"]) / (diff["width"] - c["empty"])
    assert c["A-only"] >= 4 and c["B-only"] >= 4 and c["shared"] >= 8  # the planted diff
    shared, b_only = diff["latents"]["shared"][0], diff["latents"]["B-only"][0]
    ok = gate(bundles["minilm"], parse_policy({"max_diff_exclusive_frac": round(frac, 6) + 1e-6,
                                               "diff_shared_latents": [shared]}), crosscoder=run)
    assert ok["passed"] and statuses(ok) == {"manifest": "pass", "diff_exclusive": "pass",
                                             "diff_shared": "pass"}
    assert ok["diff"]["counts"] == c and ok["diff"]["b_only"] == diff["latents"]["B-only"]
    no = gate(bundles["minilm"], parse_policy({"max_diff_exclusive_frac": frac / 2,
                                               "diff_shared_latents": [shared, b_only, 999]}),
              crosscoder=run)
    assert no["failed"] == ["diff_exclusive", "diff_shared"]
    assert no["checks"][2]["reason"] == (f"2 of 3 listed latent(s) not shared: {b_only} "
                                         "(B-only), 999 (no such latent)")
    assert f"{c['B-only']} tuned-only" in no["checks"][1]["reason"]
    info = gate(bundles["minilm"], parse_policy({}), crosscoder=run)  # reported, decides nothing
    assert info["passed"] and statuses(info)["diff_exclusive"] == "info"
    missing = gate(bundles["minilm"], parse_policy({"max_diff_exclusive_frac": 0.5}))
    assert missing["failed"] == ["diff_exclusive"] and "no --crosscoder" in missing["checks"][1][
        "reason"]
    plain = gate(bundles["minilm"], parse_policy({"max_diff_exclusive_frac": 0.5}),
                 crosscoder=bundles["minilm"])  # not a run: fails with diff's one line
    assert plain["failed"] == ["diff_exclusive"]


@pytest.mark.parametrize("text,needle", [
    ("min_fidelty = 0.9\n", "unknown key 'min_fidelty'"),
    ('min_fidelity = "high"\n', "min_fidelity must be a finite number"),
    ("max_poisoning_flags = 1.5\n", "max_poisoning_flags must be an integer"),
    ("acknowledged_features = [1, -2]\n", "acknowledged_features must be a list"),
    ("allow_missing = 1\n", "allow_missing must be true or false"),
    ("min_fidelity = \n", "is not valid TOML"),
    ("min_faithfulness_auc = 0.7\nmin_faithfulness_auc_margin = 0.2\n", "not both"),
    ("max_diff_exclusive_frac = 1.5\n", "max_diff_exclusive_frac must be in [0, 1]"),
])
def test_bad_policy_is_one_line(bundles, tmp_path, capsys, text, needle):
    (tmp_path / "policy.toml").write_text(text)
    assert main(["gate", str(bundles["minilm"]), "--policy", str(tmp_path / "policy.toml"),
                 "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sae-jax: error: ") and needle in err[0], err
    assert not (tmp_path / "g").exists()


def test_out_inside_the_bundle_is_refused(bundles, tmp_path, capsys):
    (tmp_path / "policy.toml").write_text("")
    with pytest.raises(UserError, match="inside the bundle"):
        from sae_jax.release.gate import out_dir_for
        out_dir_for(bundles["minilm"], str(bundles["minilm"] / "gate"), None)
    assert main(["gate", str(bundles["minilm"]), "--policy", str(tmp_path / "policy.toml"),
                 "--out", str(bundles["minilm"] / "reports")]) == 2
    assert verify_manifest(bundles["minilm"]) == []


POLICY = """\
min_fidelity = 0.9
max_dark_matter = 0.2
min_faithfulness_auc = 0.8
max_dead_frac = 0.1
acknowledged_features = [3, 7]
min_drift_pwmcc = 0.99
"""


@pytest.mark.entry
def test_cli_pass_and_fail(bundles, crosscoder, tmp_path):
    """Through the `sae-jax` entry point: exit 0 with gate.json/gate.md next to the bundle,
    then exit 1 for a bundle that drifted and a crosscoder with too many exclusive latents,
    its table naming the failed checks."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    ok = sae_jax_cli("gate", bundles["minilm"], "--policy", policy, "--baseline",
                     bundles["same"], timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    line = json.loads(ok.stdout.splitlines()[-1])
    assert line["passed"] and [c["status"] for c in line["checks"]] == ["pass"] * 8
    out = bundles["minilm"].parent / "gate-minilm"
    assert line["out"] == {"json": str(out / "gate.json"), "md": str(out / "gate.md")}
    assert json.loads((out / "gate.json").read_text())["drift"]["pwmcc"] > 0.99
    assert "# Release gate: PASS" in (out / "gate.md").read_text()
    strict = tmp_path / "strict.toml"
    strict.write_text(POLICY + "max_diff_exclusive_frac = 0.05\n")
    bad = sae_jax_cli("gate", bundles["half"], "--policy", strict, "--baseline",
                      bundles["minilm"], "--crosscoder", crosscoder[0], "--out", tmp_path / "g",
                      timeout=120)
    assert bad.returncode == 1, bad.stderr[-2000:]
    line = json.loads(bad.stdout.splitlines()[-1])
    assert not line["passed"] and line["failed"] == ["drift_pwmcc", "diff_exclusive"]
    assert "gate FAIL (2 failed: drift_pwmcc, diff_exclusive)" in bad.stderr
    assert "Traceback" not in bad.stderr
    md = (tmp_path / "g" / "gate.md").read_text()
    assert "### Vanished: 16 baseline features" in md and "| 16 |" in md
    n_b = crosscoder[1]["counts"]["B-only"]
    assert "## Model diff (crosscoder)" in md and f"### tuned-only (new in this model): {n_b}" in md
    assert verify_manifest(bundles["minilm"]) == []  # the gate wrote nothing inside
