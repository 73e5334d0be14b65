"""SAELens 6.x folders: `export_saelens(RUN_DIR, OUT_DIR)` and `import_saelens(SAE_DIR, RUN_DIR)`.

An export is a folder `SAE.load_from_disk` opens: `cfg.json` plus `sae_weights.safetensors`
(float32 `W_enc (d_in, d_sae)`, `b_enc (d_sae,)`, `W_dec (d_sae, d_in)`, `b_dec (d_in,)`, and
`threshold (d_sae,)` for jumprelu), and `feature_catalog.json` when the run has one.

Folding the input scale c (`sae_jax` multiplies raw x by c before encoding, divides after
decoding; SAELens takes raw x with `normalize_activations: "none"`). Ours, with W, b_e, W_d,
b the stored params:

    pre   = (c·x − b) @ W + b_e          x̂ = (f @ W_d + b) / c

SAELens (`apply_b_dec_to_input: true`):  pre' = (x − b') @ W' + b_e',  x̂' = f @ W_d' + b'.
With W' = c·W, b' = b / c, b_e' = b_e, W_d' = W_d / c:

    pre' = (x − b/c) @ (c·W) + b_e = (c·x − b) @ W + b_e = pre
    x̂'   = f @ W_d / c + b / c = x̂

(SAELens's own rule, `W_enc *= c; W_dec /= c; b_dec /= c`, with b_enc unchanged.) Since
pre' = pre, everything in pre-activation units is unchanged: the jumprelu threshold
exp(log_threshold), the batchtopk threshold, and topk's ranking; f itself is unchanged, so
SAELens's `encode` returns our features.
TopK is exported with `rescale_acts_by_decoder_norm: false`: the folded decoder rows have norm
1/c, and with rescaling on SAELens would return f/c from `encode` (decode would still agree).

Architectures: relu -> "standard"; jumprelu -> "jumprelu" with `threshold = exp(log_threshold)`
(our f = h·H(h−θ) equals SAELens's ReLU(h)·H(h−θ) because θ > 0); topk -> "topk" (top-k of
the signed pre-activations, then ReLU, in both); batchtopk -> "jumprelu" with every threshold
equal to our scalar inference threshold (our f = ReLU(h)·H(h−θ), SAELens's formula exactly,
for any sign of θ), as SAELens exports its own BatchTopK. `metadata.training_architecture`
names the SAELens-style training architecture (standard/jumprelu/topk/batchtopk); sae_jax's
own arch, input scale, step and config are under `metadata.training_architecture_details`.

Matryoshka BatchTopK is exported like BatchTopK, as "jumprelu" with its scalar threshold (as
SAELens saves its own `matryoshka_batchtopk`). Transcoders (`apply_b_dec_to_input: false`,
`d_out`) become "transcoder" / "skip_transcoder" (relu) or "jumprelu_transcoder" /
"jumprelu_skip_transcoder" (jumprelu, batchtopk, matryoshka); the target scale c_t folds into
the decoder (W_d / c_t, b / c_t) and the skip map (W_skip · c / c_t). SAELens has no TopK
transcoder, so exporting one is refused with a hint.

Import reverses this into a new run directory (input_scale 1.0, params in an Orbax checkpoint
of a full, fresh train state at step 0). SAELens variants are folded into our form exactly:
`apply_b_dec_to_input: false` (h = x @ W + b_e) becomes b_e' = b_e + b_dec @ W; topk with
`rescale_acts_by_decoder_norm: true` (rank h·n, decode f/n, n = ‖W_dec_i‖) becomes W_enc·n,
b_enc·n, W_dec/n (SAELens's `_fold_norm_topk`); a jumprelu threshold θ becomes
log_threshold = log(max(θ, tiny)) (θ ≤ 0, which SAELens treats as plain ReLU, becomes the
smallest normal float32, so f differs only for 0 < h ≤ 1.2e-38); a jumprelu whose
`metadata.training_architecture` is "batchtopk" or "matryoshka_batchtopk" and whose thresholds
are all equal comes back as our batchtopk (a Matryoshka SAE's inference is BatchTopK's).
Weights are rounded to cfg.json's `dtype` (as SAELens casts them) and then computed in
float32.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from sae_jax import files
from sae_jax.data import safetensors_io
from sae_jax.errors import UserError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
CATALOG_FILE = "feature_catalog.json"
SAELENS_VERSION = "6.0.0"

EXPORT_ARCH = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk",
               "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
TRAINING_ARCH = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk",
                 "batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}
THRESHOLD_ARCHS = ("batchtopk", "matryoshka")  # one scalar inference threshold
# Transcoders: (inference form, with skip connection). SAELens has no TopK transcoder.
TRANSCODER_ARCH = {"standard": ("transcoder", "skip_transcoder"),
                   "jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder")}
IMPORT_ARCH = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
BASE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
_CFG_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
               "bfloat16": ml_dtypes.bfloat16}  # SAELens's DTYPE_MAP (constants.py)


# ---------------------------------------------------------------------------------------------
# export


def saelens_tensors(params: dict, arch: str, input_scale: float,
                    target_scale: float | None = None) -> dict[str, np.ndarray]:
    """Our params (scaled units) -> SAELens's tensors on raw inputs, float32.

    A transcoder's outputs are divided by its `target_scale` c_t instead of c, and its skip
    map becomes W_skip·c/c_t."""
    import jax.numpy as jnp

    c = np.float64(input_scale)
    c_out = c if target_scale is None else np.float64(target_scale)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    out = {"W_enc": p["W_enc"] * c, "b_enc": p["b_enc"], "W_dec": p["W_dec"] / c_out,
           "b_dec": p["b_dec"] / c_out}
    if "W_skip" in p:
        out["W_skip"] = p["W_skip"] * (c / c_out)
    width = p["b_enc"].shape[0]
    if arch == "jumprelu":  # XLA's exp, bit for bit the θ our encoder compares with
        out["threshold"] = np.asarray(jnp.exp(jnp.asarray(params["log_threshold"])))
    elif arch in THRESHOLD_ARCHS:
        out["threshold"] = np.full((width,), np.float32(params["threshold"]))
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def saelens_cfg(arch: str, d_in: int, d_sae: int, k: int, details: dict,
                transcoder: tuple[int, bool] | None = None) -> dict:
    """SAELens's cfg.json; `transcoder` = (d_out, has a skip connection) for a transcoder."""
    architecture = EXPORT_ARCH[arch]
    if transcoder is not None:
        if architecture not in TRANSCODER_ARCH:
            raise UserError(f"SAELens has no {arch} transcoder (its transcoders are relu, "
                            "jumprelu and their skip variants); train a transcoder with "
                            "arch=batchtopk or matryoshka (exported as jumprelu) to share it")
        architecture = TRANSCODER_ARCH[architecture][int(transcoder[1])]
    cfg = {
        "architecture": architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": transcoder is None,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if transcoder is not None:
        cfg["d_out"] = int(transcoder[0])
    if arch == "topk":
        cfg["k"] = int(k)
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["metadata"] = {"sae_lens_version": SAELENS_VERSION,
                       "training_architecture": TRAINING_ARCH[arch],
                       "training_architecture_details": details}
    return cfg


def _store_provenance(data_dir: str) -> dict:
    """The store's producer (model, layer, hook), best effort, for the export's metadata."""
    if not data_dir or "://" in data_dir:
        return {}
    try:
        meta = json.loads((Path(data_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: meta[k] for k in ("source", "model", "layer", "hook") if k in meta}


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / CFG_FILE).exists():
        raise UserError(f"{out} exists, is not empty and holds no SAELens export; "
                        "choose a new directory")


def export_saelens(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   step: int | None = None) -> dict:
    """Writes the run's SAE (latest or `step`'s checkpoint) as a SAELens 6.x folder.

    Returns:
      `{"architecture", "training_architecture", "d_in", "d_sae", "input_scale", "step",
      "out_dir", "files"}` (files: names inside out_dir).

    Raises:
      UserError: no run / checkpoint, an unusable out_dir, non-finite params or scale.
    """
    import safetensors.numpy

    import sae_jax
    from sae_jax.rundir import read_run

    run_dir, out = Path(run_dir), Path(out_dir)
    run = read_run(run_dir)
    _check_out_dir(out)
    sae = sae_jax.load(run_dir, step)
    arch, c = sae.config.arch, float(sae.input_scale)
    if not (np.isfinite(c) and c > 0):
        raise UserError(f"run {run_dir} has input_scale {c}; it must be finite and > 0")
    params = {k: np.asarray(v) for k, v in sae.params.items()}
    bad = [k for k, v in params.items() if not np.all(np.isfinite(v))]
    if bad:
        raise UserError(f"run {run_dir} step {sae.step} has non-finite values in "
                        f"{', '.join(sorted(bad))}; nothing exported")
    tensors = saelens_tensors(params, arch, c, sae.target_scale)
    details = {"library": "sae_jax", "sae_jax_version": sae_jax.__version__, "arch": arch,
               "input_scale": c, "step": sae.step, "config": sae.config.to_dict()}
    if sae.transcoder:
        details["target_scale"] = float(sae.target_scale)
    data = _store_provenance(run.data_dir)
    if data:
        details["data"] = data
    if arch in THRESHOLD_ARCHS:
        details["threshold"] = float(params["threshold"])
    transcoder = (sae.d_out, "W_skip" in params) if sae.transcoder else None
    cfg = saelens_cfg(arch, sae.d_in, sae.width, sae.config.k, details, transcoder)

    out.mkdir(parents=True, exist_ok=True)
    files.write_bytes(out / WEIGHTS_FILE, safetensors.numpy.save(tensors))
    files.write_text(out / CFG_FILE, json.dumps(cfg, indent=2) + "\n")
    written = [CFG_FILE, WEIGHTS_FILE]
    catalog = run_dir / CATALOG_FILE
    if catalog.is_file():
        files.write_bytes(out / CATALOG_FILE, Path(catalog).read_bytes())
        written.append(CATALOG_FILE)
    elif (out / CATALOG_FILE).exists():  # a stale catalog from an earlier export
        (out / CATALOG_FILE).unlink()
    return {"architecture": cfg["architecture"], "training_architecture": arch,
            "d_in": sae.d_in, "d_sae": sae.width, "input_scale": c, "step": sae.step,
            "out_dir": str(out.absolute()), "files": written}


# ---------------------------------------------------------------------------------------------
# import


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, which must all be floating point."""
    tensors = safetensors_io.read_all(path)
    for name, tensor in tensors.items():
        if tensor.dtype.kind != "f" and tensor.dtype != ml_dtypes.bfloat16:
            names = ", ".join(k for k, v in safetensors_io.DTYPES.items()
                              if np.dtype(v).kind == "f" or v is ml_dtypes.bfloat16)
            raise UserError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; expected a "
                            f"float type ({names})")
    return tensors


def _read_cfg(sae_dir: Path) -> dict:
    if not sae_dir.is_dir():
        raise UserError(f"no SAELens folder at {sae_dir}")
    path = sae_dir / CFG_FILE
    if not path.is_file():
        raise UserError(f"{sae_dir} has no {CFG_FILE}; not a SAELens SAE folder")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} must hold a JSON object")
    return cfg


def _check_cfg(cfg: dict, path: Path) -> dict:
    """Validated fields of a SAELens cfg.json that matter for inference."""
    arch = cfg.get("architecture")
    if arch not in IMPORT_ARCH:
        hint = ("; SAELens saves BatchTopK for inference as jumprelu" if arch == "batchtopk"
                else "")
        raise UserError(f"{path}: unsupported architecture {arch!r}; supported: "
                        f"{', '.join(IMPORT_ARCH)}{hint}")
    for key in ("d_in", "d_sae"):
        if not _is_int(cfg.get(key)) or cfg[key] < 1:
            raise UserError(f"{path}: {key} must be a positive integer, got {cfg.get(key)!r}")
    dtype = cfg.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in _CFG_DTYPES:
        raise UserError(f"{path}: unsupported dtype {dtype!r}; expected one of "
                        f"{', '.join(_CFG_DTYPES)}")
    norm = cfg.get("normalize_activations", "none")
    if norm != "none":
        raise UserError(f"{path}: normalize_activations is {norm!r}; only 'none' can be "
                        "imported (fold the normalisation into the weights first)")
    if cfg.get("reshape_activations", "none") != "none":
        raise UserError(f"{path}: reshape_activations is {cfg['reshape_activations']!r}; "
                        "only 'none' can be imported")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise UserError(f"{path}: apply_b_dec_to_input must be true or false, got "
                        f"{apply_b_dec!r}")
    out = {"arch": arch, "d_in": cfg["d_in"], "d_sae": cfg["d_sae"],
           "dtype": _CFG_DTYPES[dtype.removeprefix("torch.")], "apply_b_dec": apply_b_dec,
           "rescale": False, "k": None}
    if arch == "topk":
        k = cfg.get("k")
        if k is None:
            raise UserError(f"{path}: topk SAE without k (SAELens would silently use 100)")
        if not _is_int(k) or not 1 <= k <= cfg["d_sae"]:
            raise UserError(f"{path}: k must be an integer in 1..d_sae={cfg['d_sae']}, "
                            f"got {k!r}")
        rescale = cfg.get("rescale_acts_by_decoder_norm", False)
        if not isinstance(rescale, bool):
            raise UserError(f"{path}: rescale_acts_by_decoder_norm must be true or false, "
                            f"got {rescale!r}")
        out.update(k=k, rescale=rescale)
    return out


def _check_tensors(tensors: dict, info: dict, path: Path) -> dict[str, np.ndarray]:
    d_in, d_sae = info["d_in"], info["d_sae"]
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                "b_dec": (d_in,)}
    if info["arch"] == "jumprelu":
        expected["threshold"] = (d_sae,)
    tensors = dict(tensors)
    scaling = tensors.pop("scaling_factor", None)  # SAELens drops it when it is all ones
    if scaling is not None and not np.all(np.asarray(scaling, np.float64) == 1.0):
        raise UserError(f"{path}: a scaling_factor other than all ones is not supported")
    if "log_threshold" in tensors and info["arch"] == "jumprelu":
        raise UserError(f"{path}: has log_threshold; SAELens's inference jumprelu needs "
                        "threshold (linear units)")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UserError(f"{path}: missing tensor(s) {', '.join(missing)} for "
                        f"{info['arch']} (has: {', '.join(sorted(tensors))})")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UserError(f"{path}: unexpected tensor(s) {', '.join(extra)} for {info['arch']}")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            how = " (stored transposed?)" if len(got) == 2 and got == shape[::-1] else ""
            raise UserError(f"{path}: {name} has shape {got}, expected {shape} for "
                            f"d_in={d_in}, d_sae={d_sae}{how}")
        if not np.all(np.isfinite(tensors[name].astype(np.float32))):
            raise UserError(f"{path}: {name} has non-finite values")
    # SAELens casts every tensor to cfg dtype, then computes in it; we keep that rounding.
    return {k: tensors[k].astype(info["dtype"]).astype(np.float64) for k in expected}


def our_params(t: dict[str, np.ndarray], info: dict, batchtopk: bool) -> tuple[str, dict]:
    """SAELens tensors (float64) -> (our arch, our float32 params on raw inputs, scale 1)."""
    W_enc, b_enc, W_dec, b_dec = t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
    if info["rescale"]:  # rank h·n and decode f/n  ==  unit rows, W_enc·n, b_enc·n
        n = np.linalg.norm(W_dec, axis=1)
        W_enc, b_enc = W_enc * n, b_enc * n
        W_dec = W_dec / np.where(n > 0, n, 1.0)[:, None]
    if not info["apply_b_dec"]:  # x @ W + b_e  ==  (x - b_dec) @ W + (b_e + b_dec @ W)
        b_enc = b_enc + b_dec @ W_enc
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    arch = IMPORT_ARCH[info["arch"]]
    if arch == "jumprelu":
        theta = t["threshold"].astype(np.float32)
        if batchtopk:
            arch, params["threshold"] = "batchtopk", np.float32(theta[0])
        else:
            tiny = np.finfo(np.float32).tiny
            params["log_threshold"] = np.log(np.maximum(theta, tiny))
    return arch, {k: np.asarray(v, np.float32) for k, v in params.items()}


def _check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not empty; choose a new RUN_DIR")


def import_saelens(sae_dir: str | os.PathLike, run_dir: str | os.PathLike) -> dict:
    """Reads a SAELens folder (standard/jumprelu/topk) into a new sae_jax run directory.

    `sae_jax.load(run_dir)` then encodes/decodes raw activations as SAELens's
    `SAE.load_from_disk(sae_dir)` does.

    Returns:
      `{"arch", "source_architecture", "d_in", "d_sae", "k", "run_dir", "files"}`.

    Raises:
      UserError: a folder SAELens could not load, or a variant sae_jax cannot represent.
    """
    import jax
    import jax.numpy as jnp

    from sae_jax.training import checkpoint
    from sae_jax.config import make_config
    from sae_jax.rundir import CONFIG_FILE, RunInfo, write_run
    from sae_jax.training.train import init_state, make_optimizer

    sae_dir, run_dir = Path(sae_dir), Path(run_dir)
    cfg_json = _read_cfg(sae_dir)
    info = _check_cfg(cfg_json, sae_dir / CFG_FILE)
    weights = sae_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{sae_dir} has no {WEIGHTS_FILE}")
    tensors = _check_tensors(read_safetensors(weights), info, weights)
    _check_run_dir(run_dir)

    meta = cfg_json.get("metadata") if isinstance(cfg_json.get("metadata"), dict) else {}
    details = meta.get("training_architecture_details")
    details = details if isinstance(details, dict) else {}
    theta = tensors.get("threshold")
    batchtopk = (info["arch"] == "jumprelu"
                 and meta.get("training_architecture") in ("batchtopk", "matryoshka_batchtopk")
                 and bool(np.all(theta.astype(np.float32) == np.float32(theta[0]))))
    arch, params = our_params(tensors, info, batchtopk)
    k = info["k"]
    if k is None:  # not used at inference; keep a valid config (k <= width)
        saved_k = details.get("config", {}).get("k") if isinstance(
            details.get("config"), dict) else None
        k = saved_k if _is_int(saved_k) and 1 <= saved_k <= info["d_sae"] else min(
            32, info["d_sae"])
    cfg = make_config(arch=arch, width=info["d_sae"], k=k)

    tx = make_optimizer(cfg)
    state = init_state(jax.random.key(cfg.seed), cfg, info["d_in"], None, tx)
    new = {name: jnp.asarray(v) for name, v in params.items()}
    want = jax.tree.map(lambda a: (a.shape, a.dtype), state.params)
    if jax.tree.map(lambda a: (a.shape, a.dtype), new) != want:  # a bug here, not user input
        raise AssertionError(f"imported params {new.keys()} do not match {want}")
    state = state.replace(params=new, opt_state=tx.init(new))

    run_dir.mkdir(parents=True, exist_ok=True)
    write_run(run_dir, RunInfo(cfg, info["d_in"], 1.0, ""))
    source = {"sae_dir": str(sae_dir.absolute()), "cfg": cfg_json}
    (run_dir / "imported_from.json").write_text(json.dumps(source, indent=2) + "\n")
    mngr = checkpoint.manager(run_dir, cfg)
    try:
        checkpoint.save(mngr, 0, state)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    written = [CONFIG_FILE, "imported_from.json", checkpoint.CHECKPOINT_DIR]
    if (sae_dir / CATALOG_FILE).is_file():
        shutil.copyfile(sae_dir / CATALOG_FILE, run_dir / CATALOG_FILE)
        written.append(CATALOG_FILE)
    return {"arch": arch, "source_architecture": info["arch"], "d_in": info["d_in"],
            "d_sae": info["d_sae"], "k": cfg.k, "run_dir": str(run_dir.absolute()),
            "files": written}


__all__ = ["export_saelens", "import_saelens", "read_safetensors", "saelens_cfg",
           "saelens_tensors"]
