"""`sae-jax bundle` and `sae-jax verify` on a tiny real MiniLM harvest and SAE: the bundle
holds the contract's files, verify passes on it, and fails, naming the check, on a flipped
byte in any file, an edited catalog value, a swapped SAE and a different model."""

import json
import shutil

import numpy as np
import pytest
from conftest import CAUSAL_FIXTURES, json_result, one_error_line, sae_jax_cli  # noqa: E402

from sae_jax.errors import UserError  # noqa: E402
from sae_jax.release import manifest as names  # noqa: E402
from sae_jax.release.verify import verify_bundle  # noqa: E402

FILES = ["bill.json", "catalog.json", "contexts.npz", "provenance.json", "reports/eval.json",
         "sae/cfg.json", "sae/sae_weights.safetensors"]
"""What a bundle of a run without an audit holds, besides manifest.json."""
STEPS, BATCH = 60, 128


@pytest.fixture(scope="module")
def bundled(tmp_path_factory, params):  # `params` loads MiniLM once for the session
    import jax

    from sae_jax.config import make_config
    from sae_jax.lm.harvest import run_harvest
    from sae_jax.training.train import train

    tmp = tmp_path_factory.mktemp("bundle")
    run_harvest(tmp / "store", layer=3, max_tokens=4000, seq_len=32, progress=False)
    cfg = make_config(arch="topk", width=256, k=8, steps=STEPS, batch_size=BATCH,
                      holdout=0.2, log_every=10, ckpt_every=STEPS // 2)
    train(cfg, tmp / "store", tmp / "run", progress=False, devices=jax.devices()[:1])
    out = sae_jax_cli("bundle", tmp / "run", tmp / "bundle", "--contexts", "24",
                      "--fidelity-sequences", "4")
    return tmp, json_result(out)


def tampered(tmp, name: str):
    """A fresh copy of the bundle to change."""
    copy = tmp / "tampered" / name
    shutil.copytree(tmp / "bundle", copy)
    return copy


def failed(result: dict) -> set[str]:
    assert result["ok"] is False
    return set(result["failed"])


def test_bundle_holds_the_contract(bundled):
    tmp, result = bundled
    root = tmp / "bundle"
    manifest = json.loads((root / names.MANIFEST).read_text())
    assert manifest["format"] == "sae-jax-bundle/1" and result["files"] == FILES
    assert result["manifest_sha256"] == names.file_sha256(root / names.MANIFEST)
    assert sorted(manifest["files"]) == FILES == names.bundle_files(root)
    for rel, entry in manifest["files"].items():
        assert entry == {"sha256": names.file_sha256(root / rel),
                         "bytes": (root / rel).stat().st_size}
    prov = json.loads((root / names.PROVENANCE).read_text())
    assert prov["model"]["kind"] == "minilm" and prov["layer"] == 3
    assert prov["model"]["sha256"] == result["model_sha256"]
    assert set(prov["model"]["sha256"]) == {"model.safetensors"}
    assert prov["n_tokens"] == {"trained": STEPS * BATCH, "store_rows": 4000, "train_rows": 3200}
    assert prov["training_config"]["width"] == 256 and len(prov["corpus"]["sha256"]) == 64
    assert prov["code_version"]["sae_jax"] and prov["store_id"]
    bill = json.loads((root / names.BILL).read_text())
    assert bill["tokens"] == STEPS * BATCH and bill["accelerator"] == "v5p-8"
    assert bill["wall_seconds"] > 0 and bill["chip_hours"] > 0 and bill == result["bill"]
    report = json.loads((root / names.EVAL).read_text())
    assert 0 < report["fvu"] < 1 and report["step"] == STEPS and "fidelity" in report
    cfg = json.loads((root / "sae" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_sae"], cfg["k"]) == ("topk", 256, 8)
    with np.load(root / names.CONTEXTS, allow_pickle=False) as z:
        assert z["ids"].shape == (24, 32) and z["value"].dtype == np.float32
        assert np.all(z["ids"][:, 0] == 101)  # [CLS] first, as harvested
        assert np.all(z["mask"][np.arange(24), z["position"]] == 1)
    # What the run lacked was made where its own command keeps it.
    assert (tmp / "run" / "feature_catalog.json").is_file()
    assert (tmp / "run" / "eval" / "eval.json").is_file()


@pytest.mark.entry
def test_verify_passes_against_the_model_and_the_store(bundled):
    tmp, _ = bundled
    out = sae_jax_cli("verify", tmp / "bundle", "--model", "minilm", "--data", tmp / "store",
                      "--samples", "24")
    result = json_result(out)
    assert result["manifest_sha256"] == bundled[1]["manifest_sha256"]
    names_seen = [c["name"] for c in result["checks"]]
    assert result["ok"] and names_seen == ["manifest", "files", "hashes", "json", "sae",
                                           "contexts", "model_hash", "rederive", "data"]
    for name in names_seen:
        assert f"PASS {name}: " in out.stderr
    assert "24 of 24 fire at the recorded value" in out.stderr


@pytest.mark.parametrize("rel", [names.MANIFEST, *FILES])
def test_one_flipped_byte_in_any_file_fails(bundled, rel):
    tmp, _ = bundled
    root = tampered(tmp, f"flip-{rel.replace('/', '-')}")
    data = bytearray((root / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / rel).write_bytes(bytes(data))
    bad = failed(verify_bundle(root))
    assert ("manifest" if rel == names.MANIFEST else "hashes") in bad or (
        rel == names.MANIFEST and "hashes" in bad), bad


def test_the_fingerprint_pins_the_manifest(bundled):
    """Re-hashing a changed bill passes the hashes, but not the published fingerprint."""
    tmp, result = bundled
    assert verify_bundle(tmp / "bundle", expect=result["manifest_sha256"])["ok"]
    root = tampered(tmp, "rebilled")
    bill = json.loads((root / names.BILL).read_text())
    (root / names.BILL).write_text(json.dumps({**bill, "chip_hours": bill["chip_hours"] / 10}))
    names.write_manifest(root)
    assert failed(verify_bundle(root, expect=result["manifest_sha256"])) == {"fingerprint"}


def test_unlisted_and_missing_files_fail(bundled):
    tmp, _ = bundled
    root = tampered(tmp, "layout")
    (root / "reports" / "extra.json").write_text("{}\n")
    (root / names.BILL).unlink()
    result = verify_bundle(root)
    assert {"files", "json"} <= failed(result)
    detail = next(c["detail"] for c in result["checks"] if c["name"] == "files")
    assert "missing: bill.json" in detail and "unlisted: reports/extra.json" in detail


def test_an_edited_catalog_value_fails(bundled):
    """One recorded activation changed, manifest re-hashed: the catalog no longer agrees with
    contexts.npz; edit both alike and the model re-derivation catches it."""
    tmp, _ = bundled
    root = tampered(tmp, "catalog")
    with np.load(root / names.CONTEXTS, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    feature, row = int(arrays["feature"][0]), int(arrays["row"][0])
    catalog = json.loads((root / names.CATALOG).read_text())
    entry = next(f for f in catalog["features"] if f["id"] == feature)
    example = next(e for e in entry["top_examples"] if e["row"] == row)
    example["value"] = round(example["value"] * 1.5, 4)
    (root / names.CATALOG).write_text(json.dumps(catalog))
    names.write_manifest(root)
    assert failed(verify_bundle(root)) == {"contexts"}

    arrays["value"][0] = np.float32(example["value"])
    np.savez(root / names.CONTEXTS, **arrays)
    names.write_manifest(root)
    result = verify_bundle(root, model="minilm", samples=24)
    assert failed(result) == {"rederive"}
    detail = next(c["detail"] for c in result["checks"] if c["name"] == "rederive")
    assert detail.startswith("1 of 24 off") and f"feature {feature} row {row}" in detail


@pytest.mark.parametrize("swap", ["earlier checkpoint", "other seed"])
def test_a_swapped_sae_fails(bundled, swap):
    """Another SAE of the same shape in the SAE's place, manifest re-hashed: every file checks
    out, but its features do not fire where the catalog says. The run's own checkpoint of
    half as many steps is the hardest case (nearly the same weights); the other is a fresh
    SAE of another seed."""
    import jax
    import safetensors.numpy

    import sae_jax
    from sae_jax import saes
    from sae_jax.saelens.export import export_saelens, saelens_tensors

    tmp, _ = bundled
    root = tampered(tmp, swap.replace(" ", "-"))
    if swap == "earlier checkpoint":
        export_saelens(tmp / "run", root / "sae", step=STEPS // 2, force=True)
        (root / "sae" / "feature_catalog.json").unlink(missing_ok=True)
    else:
        sae = sae_jax.load(tmp / "run")
        fresh = saes.init(jax.random.key(1), sae.config, sae.d_in)
        safetensors.numpy.save_file(saelens_tensors(fresh, "topk", sae.input_scale),
                                    str(root / "sae" / "sae_weights.safetensors"))
    names.write_manifest(root)
    assert verify_bundle(root)["ok"]  # hashes alone cannot tell
    result = verify_bundle(root, model="minilm", samples=24)
    assert failed(result) == {"rederive"}


@pytest.mark.entry
def test_a_different_model_fails(bundled, tmp_path):
    """A copy of MiniLM with 5 % weight noise on blocks 1..3 (as experiments/drift_minilm.py
    perturbs it), and a causal LM folder: the weight hashes differ and the features move."""
    import safetensors.numpy

    from sae_jax.lm import minilm

    tmp, _ = bundled
    src = minilm.model_dir()
    tensors = safetensors.numpy.load_file(str(src / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name, w in tensors.items():
        if w.ndim == 2 and any(name.startswith(f"encoder.layer.{i}.") for i in range(3)):
            rms = np.sqrt(np.mean(np.square(w, dtype=np.float64)))
            tensors[name] = (w + 0.05 * rms * rng.standard_normal(w.shape)).astype(w.dtype)
    perturbed = tmp_path / "minilm-perturbed"
    perturbed.mkdir()
    shutil.copyfile(src / "config.json", perturbed / "config.json")
    safetensors.numpy.save_file(tensors, str(perturbed / "model.safetensors"))

    out = sae_jax_cli("verify", tmp / "bundle", "--model", perturbed, "--samples", "24")
    assert out.returncode == 1, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert failed(result) == {"model_hash", "rederive"}
    assert "FAIL model_hash: " in out.stderr and "FAIL rederive: " in out.stderr
    assert out.stderr.rstrip().endswith("2 check(s) failed: model_hash, rederive")
    assert "Traceback" not in out.stderr

    result = verify_bundle(tmp / "bundle", model=str(CAUSAL_FIXTURES / "gpt2"))
    assert failed(result) == {"model_hash", "rederive"}


@pytest.mark.entry
def test_usage_errors(bundled):
    tmp, _ = bundled
    line = one_error_line(sae_jax_cli("verify", tmp / "nowhere"))
    assert "no bundle folder" in line
    with pytest.raises(UserError, match="no such folder"):
        verify_bundle(tmp / "bundle", model=str(tmp / "no-model"))
    with pytest.raises(UserError, match="not an empty folder"):
        from sae_jax.release.bundle import write_bundle

        write_bundle(tmp / "run", tmp / "bundle")


def test_an_existing_audit_report_is_included_unless_no_audit(bundled, tmp_path):
    """RUN/audit/audit.json (where `sae-jax audit` writes it) travels as reports/audit.json;
    the catalog and eval the first bundle made are reused, not rebuilt."""
    from sae_jax.analysis.audit_report import AUDIT_DIR, AUDIT_FILE
    from sae_jax.release.bundle import write_bundle

    tmp, _ = bundled
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    report = {"summary": {"causal": {"median": 1.5, "median_random": 0.1, "auc": 0.9}},
              "coverage": {"fvu": 0.2}, "features": []}
    (run / AUDIT_DIR).mkdir()
    (run / AUDIT_DIR / AUDIT_FILE).write_text(json.dumps(report))
    said = []
    result = write_bundle(run, tmp_path / "with", n_contexts=8, log=said.append)
    assert said == [] and result["files"] == sorted([*FILES, names.AUDIT])
    assert json.loads((tmp_path / "with" / names.AUDIT).read_text()) == report
    assert verify_bundle(tmp_path / "with")["ok"]
    result = write_bundle(run, tmp_path / "without", n_contexts=8, audit="skip")
    assert result["files"] == FILES and verify_bundle(tmp_path / "without")["ok"]


def test_a_catalog_that_is_not_the_sae_s_is_refused(bundled, tmp_path):
    """Every recorded value of the run's catalog doubled: bundle re-encodes the sampled rows
    and refuses to ship it, writing nothing."""
    from sae_jax.release.bundle import write_bundle

    tmp, _ = bundled
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    catalog = json.loads((run / "feature_catalog.json").read_text())
    for entry in catalog["features"]:
        for example in entry["top_examples"]:
            example["value"] *= 2
    (run / "feature_catalog.json").write_text(json.dumps(catalog))
    with pytest.raises(UserError, match="catalog does not match its SAE"):
        write_bundle(run, tmp_path / "out", n_contexts=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_causal_lm_bundle_verifies_against_its_model_only(tmp_path):
    """A tiny causal LM (BOS-framed sequences, JumpReLU SAE): the bundle re-derives with its
    own folder, and fails against MiniLM (another causal folder fails as in the MiniLM
    bundle's test)."""
    import jax

    import sae_jax
    from sae_jax.analysis.evaluate import evaluate, write_eval_artifacts
    from sae_jax.config import make_config
    from sae_jax.data.store import open_store
    from sae_jax.lm.harvest import run_harvest
    from sae_jax.release.bundle import write_bundle
    from sae_jax.training.train import train

    llama = CAUSAL_FIXTURES / "llama"
    run_harvest(tmp_path / "store", model=str(llama), layer=1, max_tokens=2000, seq_len=32,
                progress=False)
    cfg = make_config(arch="jumprelu", width=128, steps=30, batch_size=128, holdout=0.2)
    train(cfg, tmp_path / "store", tmp_path / "run", progress=False, devices=jax.devices()[:1])
    # The core eval only (loss recovered compiles the LM twice more; the MiniLM bundle above
    # runs the whole eval): a bundle takes the run's eval.json as it is.
    sae, store = sae_jax.load(tmp_path / "run"), open_store(tmp_path / "store")
    core = {"step": sae.step, **evaluate(sae, store.split(0.2)[1])}
    write_eval_artifacts(core, tmp_path / "run" / "eval")
    result = write_bundle(tmp_path / "run", tmp_path / "bundle", n_contexts=12)
    assert json.loads((tmp_path / "bundle" / names.EVAL).read_text())["fvu"] == core["fvu"]
    prov = json.loads((tmp_path / "bundle" / names.PROVENANCE).read_text())
    assert prov["model"]["kind"] == "causal" and prov["model"]["sha256"] == result[
        "model_sha256"]
    with np.load(tmp_path / "bundle" / names.CONTEXTS, allow_pickle=False) as z:
        bos = json.loads((llama / "config.json").read_text())["bos_token_id"]
        assert np.all(z["ids"][:, 0] == bos)
    ok = verify_bundle(tmp_path / "bundle", model=str(llama), data=str(tmp_path / "store"))
    assert ok["ok"], ok["checks"]
    assert failed(verify_bundle(tmp_path / "bundle", model="minilm")) == {"model_hash",
                                                                          "rederive"}
