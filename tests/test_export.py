"""SAELens export/import: files, cfg.json, tensors, and SAELens's own inference math.

`saelens_encode` / `saelens_decode` re-implement SAELens 6.x's inference classes in numpy
(shared/notes/saelens_format.md §5), so the exported folders are checked without torch. Runs
train on the synthetic rows times 37, so the input scale is far from 1 and a wrong folding of
it cannot pass.
"""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sae_jax
from sae_jax.config import make_config
from sae_jax.errors import UserError
from sae_jax.saelens import export_saelens, import_saelens, load_saelens, saelens_tensors
from sae_jax.training.train import train

ARCHS = ["relu", "jumprelu", "topk", "batchtopk", "matryoshka"]
SCALE = 37.0
BASE_KEYS = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
             "normalize_activations", "reshape_activations", "metadata"}


# --- SAELens's inference math, in numpy ---------------------------------------------------


def saelens_encode(cfg: dict, t: dict, x) -> np.ndarray:
    """SAELens `SAE.encode` for standard / topk / jumprelu (float64)."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    s = np.asarray(x, np.float64) - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    h = s @ t["W_enc"] + t["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        return np.maximum(h, 0)
    if arch == "jumprelu":
        return np.maximum(h, 0) * (h > t["threshold"])
    assert arch == "topk"
    if cfg.get("rescale_acts_by_decoder_norm", False):
        h = h * np.linalg.norm(t["W_dec"], axis=1)
    idx = np.argpartition(-h, cfg["k"] - 1, axis=1)[:, : cfg["k"]]  # k largest signed values
    rows = np.arange(h.shape[0])[:, None]
    f = np.zeros_like(h)
    f[rows, idx] = np.maximum(h[rows, idx], 0)
    return f


def saelens_decode(cfg: dict, t: dict, f) -> np.ndarray:
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    f = np.asarray(f, np.float64)
    if cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        f = f / np.linalg.norm(t["W_dec"], axis=1)
    return f @ t["W_dec"] + t["b_dec"]


def read_export(path):
    return json.loads((path / "cfg.json").read_text()), load_file(
        path / "sae_weights.safetensors")


def assert_same_codes(f, f_ref, x_hat, x_hat_ref, x):
    f, x_hat = np.asarray(f), np.asarray(x_hat)
    np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-5 * np.abs(f_ref).max())
    np.testing.assert_array_equal(f > 0, f_ref > 0)
    np.testing.assert_allclose(x_hat, x_hat_ref, rtol=1e-5, atol=1e-5 * np.abs(x).max())


# --- trained runs and their exports -------------------------------------------------------


@pytest.fixture(scope="module")
def scaled(synthetic, tmp_path_factory):
    """(store path, rows): the synthetic rows times 37."""
    from sae_jax.data.importers import import_activations

    tmp = tmp_path_factory.mktemp("scaled")
    rows = (synthetic[0] * SCALE).astype(np.float32)
    np.save(tmp / "x.npy", rows)
    return import_activations(tmp / "x.npy", tmp / "store").path, rows


@pytest.fixture(scope="module")
def runs(scaled, tmp_path_factory):
    """arch -> run dir: each architecture trained for 30 steps on the scaled rows."""
    out = {}
    for arch in ARCHS:
        out[arch] = tmp_path_factory.mktemp(arch) / "run"
        cfg = make_config(arch=arch, width=64, k=4, steps=30, batch_size=128)
        train(cfg, scaled[0], out[arch], progress=False, devices=jax.devices()[:1])
    return out


@pytest.fixture(scope="module", params=ARCHS)
def run(request, runs):
    return runs[request.param]


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "sae"
    return out, export_saelens(run, out)


@pytest.fixture(scope="module")
def x_raw(scaled):
    return scaled[1][-512:]  # held-out tail, raw units


def test_export_files_and_cfg(run, exported):
    out, summary = exported
    arch = sae_jax.load(run).config.arch
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert summary["files"] == ["cfg.json", "sae_weights.safetensors"]
    assert (summary["d_in"], summary["d_sae"], summary["training_architecture"]) == (32, 64, arch)
    cfg = json.loads((out / "cfg.json").read_text())
    expected_arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk",
                     "batchtopk": "jumprelu", "matryoshka": "jumprelu"}[arch]
    assert summary["architecture"] == cfg["architecture"] == expected_arch
    assert set(cfg) == BASE_KEYS | ({"k", "rescale_acts_by_decoder_norm"} if arch == "topk"
                                    else set())
    assert type(cfg["d_in"]) is int and type(cfg["d_sae"]) is int
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (32, 64, "float32")
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    if arch == "topk":
        assert type(cfg["k"]) is int and cfg["k"] == 4
        assert cfg["rescale_acts_by_decoder_norm"] is False
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == "6.0.0"
    assert meta["training_architecture"] == {"relu": "standard",
                                             "matryoshka": "matryoshka_batchtopk"}.get(arch, arch)
    details = meta["training_architecture_details"]
    assert details["arch"] == arch and details["step"] == 30
    assert details["input_scale"] == pytest.approx(sae_jax.load(run).input_scale)


def test_export_tensors(run, exported):
    out, _ = exported
    arch = sae_jax.load(run).config.arch
    raw = (out / "sae_weights.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    shapes = {"W_enc": [32, 64], "b_enc": [64], "W_dec": [64, 32], "b_dec": [32]}
    if arch in ("jumprelu", "batchtopk", "matryoshka"):
        shapes["threshold"] = [64]
    assert {k: v["shape"] for k, v in header.items()} == shapes
    assert {v["dtype"] for v in header.values()} == {"F32"}
    _, t = read_export(out)
    assert all(v.dtype == np.float32 for v in t.values())
    if arch in ("batchtopk", "matryoshka"):
        assert np.all(t["threshold"] == t["threshold"][0]) and t["threshold"][0] > 0


def test_saelens_math_on_raw_activations_matches_ours(run, exported, x_raw):
    sae = sae_jax.load(run)
    assert abs(np.log(sae.input_scale)) > 2  # far from 1: a wrong folding cannot pass
    cfg, t = read_export(exported[0])
    f_ref = saelens_encode(cfg, t, x_raw)
    f = sae.encode(x_raw)
    assert 0 < (f_ref > 0).sum(1).mean() < 64  # a non-trivial code
    if sae.config.arch == "topk":
        assert np.all((f_ref > 0).sum(1) <= 4)
    assert_same_codes(f, f_ref, sae.decode(f), saelens_decode(cfg, t, f_ref), x_raw)

    # The check is sensitive: exporting without folding the scale gives other numbers.
    unfolded = saelens_tensors({k: np.asarray(v) for k, v in sae.params.items()},
                               sae.config.arch, 1.0)
    wrong = saelens_decode(cfg, unfolded, saelens_encode(cfg, unfolded, x_raw))
    assert not np.allclose(wrong, sae.decode(f), atol=1e-2 * np.abs(x_raw).max())


def test_round_trip_export_import_load(run, exported, x_raw, tmp_path):
    sae = sae_jax.load(run)
    summary = import_saelens(exported[0], tmp_path / "imported")
    back = sae_jax.load(tmp_path / "imported")
    # batchtopk comes back too; matryoshka as batchtopk (its inference is BatchTopK's)
    assert back.config.arch == summary["arch"] == {"matryoshka": "batchtopk"}.get(
        sae.config.arch, sae.config.arch)
    assert (back.input_scale, back.step, back.d_in, back.width) == (1.0, 0, 32, 64)
    if sae.config.arch == "topk":
        assert back.config.k == 4
    f = back.encode(x_raw)
    assert_same_codes(f, sae.encode(x_raw), back.decode(f), sae.decode(sae.encode(x_raw)),
                      x_raw)
    # The same folder read in memory (no run written) is the same SAE, bit for bit.
    in_memory = load_saelens(exported[0])
    assert (in_memory.config.arch, in_memory.input_scale) == (back.config.arch, 1.0)
    np.testing.assert_array_equal(in_memory.encode(x_raw), f)


def test_feature_catalog_travels(runs, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(runs["relu"], run_copy)
    catalog = {"features": [{"id": 0, "label": "test"}]}
    (run_copy / "feature_catalog.json").write_text(json.dumps(catalog))
    summary = export_saelens(run_copy, tmp_path / "out")
    assert summary["files"][-1] == "feature_catalog.json"
    assert json.loads((tmp_path / "out" / "feature_catalog.json").read_text()) == catalog
    imported = import_saelens(tmp_path / "out", tmp_path / "back")
    assert "feature_catalog.json" in imported["files"]
    assert json.loads((tmp_path / "back" / "feature_catalog.json").read_text()) == catalog
    # Re-exporting into the same folder needs --force, replaces the whole folder and so
    # drops a catalog the run lost (and any other stale file).
    (run_copy / "feature_catalog.json").unlink()
    with pytest.raises(UserError, match="already holds an export; pass --force"):
        export_saelens(run_copy, tmp_path / "out")
    (tmp_path / "out" / "sparsity.safetensors").write_bytes(b"stale")
    assert export_saelens(run_copy, tmp_path / "out", force=True)["files"] == [
        "cfg.json", "sae_weights.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cfg.json", "sae_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "out", "run"]  # no temp left


def test_export_errors(runs, tmp_path):
    run = runs["relu"]
    with pytest.raises(UserError, match="no run at"):
        export_saelens(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        export_saelens(run, tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_saelens(run, tmp_path / "busy", force=True)  # --force replaces exports only
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.entry
def test_export_refuses_to_overwrite_and_a_failed_replace_keeps_the_old(runs, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "sae"
    cmd = [sys.executable, "-m", "sae_jax", "export", str(runs["relu"]), str(out)]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("pass --force to replace it (the whole folder), or "
                                           "choose a new directory")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --force, failing half way (disk full while writing the weights): the old one is intact
    real_write = Path.write_bytes

    def disk_full(self, data):
        if self.name == "sae_weights.safetensors":
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_saelens(runs["jumprelu"], out, force=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temporary folder left
    forced = subprocess.run([*cmd, "--force"], capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr


# --- importing SAELens folders made by hand -------------------------------------------------


def write_safetensors(path, tensors):
    """A plain safetensors writer (numpy's lacks bfloat16)."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(np.float64): "F64", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.int32): "I32"}
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def random_saelens(arch, d_in=16, d_sae=48, seed=0, rescale=False, apply_b_dec=True, k=6):
    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    W_dec *= (rng.uniform(0.3, 3.0, d_sae) / np.linalg.norm(W_dec, axis=1))[:, None]
    t = {"W_enc": (rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32),
         "b_enc": rng.normal(0, 0.3, d_sae).astype(np.float32),
         "W_dec": W_dec,
         "b_dec": rng.normal(0, 0.5, d_in).astype(np.float32)}
    if arch == "jumprelu":  # ~10 % non-positive: SAELens treats those as plain ReLU
        t["threshold"] = rng.uniform(-0.1, 0.8, d_sae).astype(np.float32)
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12"}}
    if arch == "topk":
        cfg.update(k=k, rescale_acts_by_decoder_norm=rescale)
    return cfg, t


def write_folder(path, cfg, t, writer=save_file):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    if writer is save_file:
        save_file(t, str(path / "sae_weights.safetensors"))
    else:
        writer(path / "sae_weights.safetensors", t)
    return path


VARIANTS = {
    "standard": dict(arch="standard"),
    "standard_no_b_dec_on_input": dict(arch="standard", apply_b_dec=False),
    "jumprelu_mixed_sign_thresholds": dict(arch="jumprelu"),
    "topk": dict(arch="topk"),
    "topk_rescaled_by_decoder_norm": dict(arch="topk", rescale=True),
    "topk_rescaled_no_b_dec_on_input": dict(arch="topk", rescale=True, apply_b_dec=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS) + ["standard_bf16"])
def test_import_matches_saelens_math(variant, tmp_path):
    cfg, t = random_saelens(**VARIANTS.get(variant, dict(arch="standard")))
    if variant == "standard_bf16":  # stored bf16: SAELens casts to cfg dtype (float32)
        t = {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}
        write_folder(tmp_path / "sae", cfg, t, write_safetensors)
    else:
        write_folder(tmp_path / "sae", cfg, t)
    summary = import_saelens(tmp_path / "sae", tmp_path / "run")
    assert summary["source_architecture"] == cfg["architecture"]
    sae = sae_jax.load(tmp_path / "run")
    x = np.random.default_rng(1).normal(size=(256, 16)).astype(np.float32) * 2
    f_ref = saelens_encode(cfg, t, x)
    assert 0 < (f_ref > 0).mean() < 1
    f = sae.encode(x)
    assert_same_codes(f, f_ref, sae.decode(f), saelens_decode(cfg, t, f_ref), x)


def test_import_batchtopk_export_as_batchtopk(tmp_path):
    cfg, t = random_saelens("jumprelu")
    t["threshold"] = np.full(48, 0.25, np.float32)
    cfg["metadata"]["training_architecture"] = "batchtopk"
    write_folder(tmp_path / "sae", cfg, t)
    assert import_saelens(tmp_path / "sae", tmp_path / "run")["arch"] == "batchtopk"
    sae = sae_jax.load(tmp_path / "run")
    assert float(sae.params["threshold"]) == 0.25
    x = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)
    f_ref = saelens_encode(cfg, t, x)
    f = sae.encode(x)
    assert_same_codes(f, f_ref, sae.decode(f), saelens_decode(cfg, t, f_ref), x)


def _transpose(cfg, t):
    t["W_enc"] = np.ascontiguousarray(t["W_enc"].T)


def _log_threshold(cfg, t):
    t["log_threshold"] = np.log(np.abs(t.pop("threshold")) + 0.1)


def _nan(cfg, t):
    t["W_dec"][3, 2] = np.nan


BAD = {  # name: (arch, cfg edit, tensor edit, error pattern)
    "unsupported_architecture": ("standard", {"architecture": "gated"}, None,
                                 "unsupported architecture 'gated'"),
    "batchtopk_architecture": ("standard", {"architecture": "batchtopk"}, None,
                               "SAELens saves BatchTopK for inference as jumprelu"),
    "no_architecture": ("standard", {"architecture": None}, None,
                        "unsupported architecture None"),
    "d_in_not_int": ("standard", {"d_in": 16.0}, None, "d_in must be a positive integer"),
    "normalize_activations": ("standard", {"normalize_activations": "expected_average_only_in"},
                              None, "normalize_activations is 'expected_average_only_in'"),
    "reshape_hook_z": ("standard", {"reshape_activations": "hook_z"}, None,
                       "reshape_activations is 'hook_z'"),
    "bad_dtype": ("standard", {"dtype": "int8"}, None, "unsupported dtype 'int8'"),
    "topk_without_k": ("topk", {"k": None}, None, "without k"),
    "topk_float_k": ("topk", {"k": 6.0}, None, "k must be an integer"),
    "topk_k_too_big": ("topk", {"k": 49}, None, "k must be an integer in 1..d_sae=48"),
    "d_in_mismatch": ("standard", {"d_in": 17}, None, r"W_enc has shape \(16, 48\), expected"),
    "transposed_W_enc": ("standard", {}, _transpose, "stored transposed"),
    "missing_tensor": ("standard", {}, lambda c, t: t.pop("b_dec"), "missing tensor.*b_dec"),
    "missing_threshold": ("jumprelu", {}, lambda c, t: t.pop("threshold"),
                          "missing tensor.*threshold"),
    "extra_tensor": ("standard", {}, lambda c, t: t.update(extra=np.zeros(3, np.float32)),
                     "unexpected tensor.*extra"),
    "log_threshold": ("jumprelu", {}, _log_threshold, "log_threshold"),
    "integer_tensor": ("standard", {}, lambda c, t: t.update(b_dec=np.zeros(16, np.int32)),
                       "has dtype int32; expected a float type"),
    "nan": ("standard", {}, _nan, "W_dec has non-finite values"),
    "float16_overflow": ("standard", {"dtype": "float16"},
                         lambda c, t: t["W_dec"].__setitem__((3, 2), 7e4),
                         r"W_dec overflows cfg.json's dtype float16 \(max \|value\| 7e\+04 > "
                         r"6.55e\+04; SAELens would compute with Inf\)"),
    "scaling_factor": ("standard", {},
                       lambda c, t: t.update(scaling_factor=np.full(48, 2, np.float32)),
                       "scaling_factor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_import_rejects_bad_folders(case, tmp_path):
    arch, edit, tensor_edit, pattern = BAD[case]
    cfg, t = random_saelens(arch)
    for key, value in edit.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    if tensor_edit:
        tensor_edit(cfg, t)
    write_folder(tmp_path / "sae", cfg, t, write_safetensors)
    with pytest.raises(UserError, match=pattern) as err:
        import_saelens(tmp_path / "sae", tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_import_rejects_bad_files_and_targets(tmp_path):
    with pytest.raises(UserError, match="no SAELens folder"):
        import_saelens(tmp_path / "missing", tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no cfg.json"):
        import_saelens(tmp_path / "empty", tmp_path / "run")
    cfg, t = random_saelens("standard")
    sae = write_folder(tmp_path / "sae", cfg, t)
    (sae / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read .*cfg.json"):
        import_saelens(sae, tmp_path / "run")
    (sae / "cfg.json").write_text(json.dumps(cfg))
    weights = (sae / "sae_weights.safetensors").read_bytes()
    (sae / "sae_weights.safetensors").write_bytes(weights[:-100])
    with pytest.raises(UserError, match="is truncated or damaged"):
        import_saelens(sae, tmp_path / "run")
    (sae / "sae_weights.safetensors").unlink()
    with pytest.raises(UserError, match="has no sae_weights.safetensors"):
        import_saelens(sae, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (sae / "sae_weights.safetensors").write_bytes(weights)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not empty"):
        import_saelens(sae, tmp_path / "run")
