"""sae_jax's own export layout (`saelens.native`): crosscoders export, `sae_jax.load` reads the
folder back with the run's exact encode/decode, `import-sae` turns it back into a run, and
damaged or foreign folders are one-line errors.

The runs are params-only runs (`write_params_run`, as `import-sae` and `prune` make them)
with random weights, sources of unequal widths and an input scale far from 1, so a wrong
offset, scale or tensor cannot pass; no training is needed for a round trip.
"""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sae_jax
from sae_jax.config import make_config
from sae_jax.data.importers import import_activations
from sae_jax.errors import UserError
from sae_jax.rundir import RunInfo
from sae_jax.sae import param_shapes
from sae_jax.saelens.export import export_native, export_run
from sae_jax.saelens.import_sae import import_saelens, load_saelens, write_params_run
from sae_jax.saes import clt
from tests.conftest import json_result, sae_jax_cli

ARCHS = ["crosscoder", "crosscoder_topk", "crosscoder_batchtopk"]
SOURCES = (16, 8)
SCALE = 37.0
STEP = 7


def random_run(path, arch: str, seed: int = 0, data_dir: str = ""):
    """A crosscoder run of random params over two sources (16 and 8 columns)."""
    cfg = make_config(arch=arch, width=48, k=4, sources=SOURCES)
    d_in = sum(SOURCES)
    rng = np.random.default_rng(seed)
    params = {k: (rng.normal(size=s.shape) * 0.3).astype(s.dtype)
              for k, s in param_shapes(cfg, d_in).items()}
    if "threshold" in params:
        params["threshold"] = np.float32(0.2)
    write_params_run(path, RunInfo(cfg, d_in, SCALE, data_dir), params, STEP)
    return path


@pytest.fixture(scope="module")
def x_raw():
    return (np.random.default_rng(1).normal(size=(64, sum(SOURCES))) / SCALE).astype(np.float32)


def assert_same_sae(a, b, x):
    """Bit for bit the same encode and decode (same params, scales, step)."""
    assert (a.config, a.input_scale, a.step) == (b.config, b.input_scale, b.step)
    f = np.asarray(a.encode(x))
    assert (f > 0).any() and (f == 0).any()
    np.testing.assert_array_equal(f, np.asarray(b.encode(x)))
    np.testing.assert_array_equal(np.asarray(a.decode(f)), np.asarray(b.decode(f)))
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


@pytest.mark.parametrize("arch", ARCHS)
def test_crosscoder_export_load_and_import_round_trip(arch, x_raw, tmp_path):
    run = random_run(tmp_path / "run", arch)
    summary = export_run(run, tmp_path / "out")  # auto: SAELens has no crosscoder class
    assert summary["format"] == "sae_jax" and summary["architecture"] == arch
    assert summary["files"] == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert (cfg["format"], cfg["format_version"], cfg["architecture"]) == ("sae_jax", 1, arch)
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"], cfg["step"]) == (24, 48, 24, STEP)
    assert [(s["name"], s["d"], s["offset"]) for s in cfg["sources"]] == [
        ("A", 16, 0), ("B", 8, 16)]
    tensors = load_file(tmp_path / "out" / "sae_weights.safetensors")
    assert cfg["scales"] == ["input_scale"] and tensors["input_scale"].dtype == np.float64
    assert float(tensors["input_scale"]) == SCALE
    assert cfg["tensors"] == {k: list(v.shape) for k, v in tensors.items()
                              if k != "input_scale"}

    original = sae_jax.load(run)
    assert_same_sae(original, sae_jax.load(tmp_path / "out"), x_raw)
    assert_same_sae(original, load_saelens(tmp_path / "out"), x_raw)  # as verify/gate read it
    imported = import_saelens(tmp_path / "out", tmp_path / "back")
    assert (imported["arch"], imported["source_architecture"]) == (arch, "sae_jax")
    assert_same_sae(original, sae_jax.load(tmp_path / "back"), x_raw)
    with pytest.raises(UserError, match=f"no SAELens export for arch={arch}.*--format sae_jax"):
        export_run(run, tmp_path / "sl", fmt="saelens")
    assert not (tmp_path / "sl").exists()


@pytest.mark.parametrize("arch", ["clt_topk", "clt_jumprelu"])
def test_cross_layer_transcoder_round_trip(arch, tmp_path):
    """A CLT (3 layers of 8: inputs then targets, per-source scales on both sides) exports in
    the sae_jax layout and loads back with the same encode/decode; its causal blocks stay 0."""
    layers, d = 3, 8
    cfg = make_config(arch=arch, width=48, k=2, sources=(d,) * 2 * layers, transcoder=True)
    rng = np.random.default_rng(3)
    mask = np.asarray(clt.decoder_mask(cfg, layers * d))
    params = {k: (rng.normal(size=s.shape) * 0.3).astype(s.dtype)
              for k, s in param_shapes(cfg, layers * d, layers * d).items()}
    params["W_dec"] = params["W_dec"] * mask
    in_scale = tuple(float(c) for c in np.repeat([3.0, 5.0, 7.0], d))
    out_scale = tuple(float(c) for c in np.repeat([11.0, 13.0, 17.0], d))
    info = RunInfo(cfg, layers * d, in_scale, "", d_out=layers * d, target_scale=out_scale)
    write_params_run(tmp_path / "run", info, params, STEP)
    assert export_run(tmp_path / "run", tmp_path / "out")["format"] == "sae_jax"
    x = rng.normal(size=(32, layers * d)).astype(np.float32) / 5
    original, back = sae_jax.load(tmp_path / "run"), sae_jax.load(tmp_path / "out")
    assert_same_sae(original, back, x)
    np.testing.assert_array_equal(np.asarray(back.params["W_dec"]) * (1 - mask), 0)
    imported = import_saelens(tmp_path / "out", tmp_path / "back")
    assert imported["arch"] == arch
    assert_same_sae(original, sae_jax.load(tmp_path / "back"), x)


def test_plain_runs_export_in_either_layout(tmp_path, x_raw):
    """Every architecture has the sae_jax layout (a scalar BatchTopK threshold included);
    auto keeps SAELens's format for what SAELens loads."""
    cfg = make_config(arch="batchtopk", width=32, k=3)
    params = {k: np.full(s.shape, 0.1, s.dtype) + np.eye(*s.shape[:2], dtype=s.dtype)
              if len(s.shape) == 2 else np.full(s.shape, 0.05, s.dtype)
              for k, s in param_shapes(cfg, 24).items()}
    write_params_run(tmp_path / "run", RunInfo(cfg, 24, SCALE, ""), params, STEP)
    assert export_run(tmp_path / "run", tmp_path / "sl")["format"] == "saelens"
    export_native(tmp_path / "run", tmp_path / "out")
    back = sae_jax.load(tmp_path / "out")
    assert float(back.params["threshold"]) == np.float32(0.05)
    assert_same_sae(sae_jax.load(tmp_path / "run"), back, x_raw * 3)
    with pytest.raises(UserError, match="export of step 7 only, not 3"):
        sae_jax.load(tmp_path / "out", step=3)


def _rewrite(folder, cfg=None, tensors=None):
    if cfg is not None:
        (folder / "cfg.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, str(folder / "sae_weights.safetensors"))


def _truncate(folder):
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


BAD = {  # case: (edit of (cfg.json, tensors) -> (new cfg.json, new tensors), error)
    "newer format": (lambda c, t: ({**c, "format_version": 2}, None), "format_version 2"),
    "missing tensor": (lambda c, t: (None, {k: v for k, v in t.items() if k != "b_enc"}),
                       r"b_enc is absent, expected float32\[48\]"),
    "transposed": (lambda c, t: (None, {**t, "W_dec": np.ascontiguousarray(t["W_dec"].T)}),
                   r"W_dec is float32\[24, 48\], expected float32\[48, 24\]"),
    "sources disagree": (lambda c, t: ({**c, "config": {**c["config"], "sources": [20, 8]}},
                                       None), "add up to 28, but the rows have width 24"),
    "non-finite": (lambda c, t: (None, {**t, "b_dec": np.full(24, np.nan, np.float32)}),
                   "non-finite values in b_dec"),
    "scale of the wrong shape": (lambda c, t: (None, {**t, "input_scale": np.full(5, 2.0)}),
                                 r"input_scale has shape \[5\]; expected \[\] or \[24\]"),
    "no scale": (lambda c, t: (None, {k: v for k, v in t.items() if k != "input_scale"}),
                 "no input_scale tensor"),
    "a saelens folder": (lambda c, t: ({k: v for k, v in c.items() if k != "format"}, None),
                         "is not a sae_jax export"),
    "truncated": (None, "truncated or damaged"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_damaged_or_foreign_exports_are_one_line_errors(case, tmp_path):
    folder = tmp_path / "out"
    export_native(random_run(tmp_path / "run", "crosscoder_topk"), folder)
    edit, message = BAD[case]
    if edit is None:
        _truncate(folder)
    else:
        cfg = json.loads((folder / "cfg.json").read_text())
        _rewrite(folder, *edit(cfg, load_file(folder / "sae_weights.safetensors")))
    with pytest.raises(UserError, match=message) as err:
        sae_jax.load(folder)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError):
        import_saelens(folder, tmp_path / "back")
    assert not (tmp_path / "back").exists()


@pytest.mark.entry
def test_crosscoder_export_through_the_entry_point(tmp_path, x_raw):
    """`sae-jax export` picks the sae_jax layout for a crosscoder by itself, and names the
    sources as the (multi-source) store does."""
    rows = np.random.default_rng(2).normal(size=(8, sum(SOURCES))).astype(np.float32)
    np.save(tmp_path / "base.npy", rows[:, :16])
    np.save(tmp_path / "chat.npy", rows[:, 16:])
    store = import_activations([tmp_path / "base.npy", tmp_path / "chat.npy"], tmp_path / "d")
    run = random_run(tmp_path / "run", "crosscoder_batchtopk", 3, str(store.path))
    out = json_result(sae_jax_cli("export", run, tmp_path / "out"))
    assert (out["format"], out["architecture"], out["step"]) == (
        "sae_jax", "crosscoder_batchtopk", STEP)
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert [(s["name"], s["d"], s["offset"]) for s in cfg["sources"]] == [
        ("base", 16, 0), ("chat", 8, 16)]
    assert_same_sae(sae_jax.load(run), sae_jax.load(tmp_path / "out"), x_raw)
