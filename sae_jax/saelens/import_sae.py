"""`sae-jax import-sae SAE_DIR RUN_DIR`: a SAELens folder as a new sae_jax run (the reverse of
`saelens.export`, see `sae_jax.saelens`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from sae_jax.data.safetensors_io import read_safetensors
from sae_jax.errors import UserError
from sae_jax.rundir import IMPORTED_FROM
from sae_jax.saelens.format import (
    CATALOG_FILE,
    CFG_DTYPES,
    CFG_FILE,
    IMPORT_ARCH,
    NATIVE_FORMAT,
    WEIGHTS_FILE,
)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in CFG_DTYPES:
        raise UserError(f"{path}: unsupported dtype {dtype!r}; expected one of "
                        f"{', '.join(CFG_DTYPES)}")
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
           "dtype": CFG_DTYPES[dtype.removeprefix("torch.")], "apply_b_dec": apply_b_dec,
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
    with np.errstate(over="ignore"):  # an overflow is reported below, as one line
        cast = {k: tensors[k].astype(info["dtype"]).astype(np.float64) for k in expected}
    for name, value in cast.items():
        if not np.all(np.isfinite(value)):
            top = float(np.abs(tensors[name].astype(np.float64)).max())
            dtype = np.dtype(info["dtype"])
            raise UserError(f"{path}: {name} overflows cfg.json's dtype {dtype.name} (max "
                            f"|value| {top:.4g} > {float(ml_dtypes.finfo(dtype).max):.4g}; "
                            "SAELens would compute with Inf): fix the dtype in cfg.json")
    return cast


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


def check_new_run_dir(run_dir: str | os.PathLike) -> None:
    """Refuses a RUN_DIR that exists and is not empty (or is a file), before any work: a new
    run never mixes with, or overwrites, what is already there."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not empty; choose a new RUN_DIR")


def write_params_run(run_dir: str | os.PathLike, info, params: dict, step: int = 0) -> list[str]:
    """Creates a run directory from params alone: `config.json` from `info` (a
    `rundir.RunInfo`) and a params-only checkpoint at `step` (see
    `checkpoint.save_params`), so `sae_jax.load`, eval, export and dashboard open it like a
    trained run. Used by `import-sae` and `sae-jax prune`.

    Returns the names written into `run_dir`.

    Raises:
      AssertionError: `params` do not have the names, shapes and dtypes `info.config` needs
        (a bug of the caller, not user input).
    """
    import jax
    import jax.numpy as jnp

    from sae_jax.rundir import CONFIG_FILE, write_run
    from sae_jax.sae import param_shapes
    from sae_jax.training import checkpoint

    new = {name: jnp.asarray(v) for name, v in params.items()}
    want = jax.tree.map(lambda a: (a.shape, a.dtype),
                        param_shapes(info.config, info.d_in, info.d_out))
    if jax.tree.map(lambda a: (a.shape, a.dtype), new) != want:
        raise AssertionError(f"params {jax.tree.map(jnp.shape, new)} do not match {want}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run(run_dir, info)
    mngr = checkpoint.manager(run_dir, info.config)
    try:
        checkpoint.save_params(mngr, step, new)
    finally:
        mngr.close()
    return [CONFIG_FILE, checkpoint.CHECKPOINT_DIR]


def _read_folder(sae_dir: Path, run_dir: Path | None = None):
    """A checked SAELens folder: `(cfg.json, its checked fields, our TrainConfig, our params
    as numpy)`; `run_dir` (an import's target) is checked before anything is folded."""
    from sae_jax.config import make_config

    cfg_json = _read_cfg(sae_dir)
    info = _check_cfg(cfg_json, sae_dir / CFG_FILE)
    weights = sae_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{sae_dir} has no {WEIGHTS_FILE}")
    tensors = _check_tensors(read_safetensors(weights), info, weights)
    if run_dir is not None:
        check_new_run_dir(run_dir)

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
    return cfg_json, info, make_config(arch=arch, width=info["d_sae"], k=k), params


def load_saelens(sae_dir: str | os.PathLike):
    """A SAELens folder as an in-memory `sae_jax.sae.SAE` (input scale 1, step 0), without
    writing a run: what `sae-jax verify` and `gate` read a bundle's SAE with. Same checks and
    folding as `import_saelens`."""
    import jax.numpy as jnp

    from sae_jax.sae import SAE, load_export

    if _is_native(Path(sae_dir)):
        return load_export(sae_dir)
    _, _, cfg, params = _read_folder(Path(sae_dir))
    return SAE(cfg, {k: jnp.asarray(v) for k, v in params.items()}, 1.0, 0)


def _is_native(sae_dir: Path) -> bool:
    """Whether the folder is an export in sae_jax's own layout (`saelens.native`)."""
    return sae_dir.is_dir() and (sae_dir / CFG_FILE).is_file() and (
        _read_cfg(sae_dir).get("format") == NATIVE_FORMAT)


def _read_native_run(sae_dir: Path, run_dir: Path):
    """An export in sae_jax's layout as `(cfg.json, RunInfo, params, step)` for a new run:
    the exported run's config, scales and step, so the new run encodes bit for bit alike."""
    from sae_jax.rundir import RunInfo
    from sae_jax.sae import load_export

    sae = load_export(sae_dir)
    check_new_run_dir(run_dir)
    info = RunInfo(sae.config, sae.d_in, sae.input_scale, "",
                   sae.d_out if sae.transcoder else None, sae.target_scale)
    return _read_cfg(sae_dir), info, {k: np.asarray(v) for k, v in sae.params.items()}, sae.step


def import_saelens(sae_dir: str | os.PathLike, run_dir: str | os.PathLike) -> dict:
    """Reads a SAELens folder (standard/jumprelu/topk) into a new sae_jax run directory, or
    an export in sae_jax's own layout (any arch: crosscoders, CLTs) back into a run.

    `sae_jax.load(run_dir)` then encodes/decodes raw activations as SAELens's
    `SAE.load_from_disk(sae_dir)` does (as the exported run did, for our layout).

    Returns:
      `{"arch", "source_architecture", "d_in", "d_sae", "k", "run_dir", "files"}`.

    Raises:
      UserError: a folder SAELens could not load, or a variant sae_jax cannot represent.
    """
    from sae_jax.rundir import RunInfo

    sae_dir, run_dir = Path(sae_dir), Path(run_dir)
    if _is_native(sae_dir):
        cfg_json, run, params, step = _read_native_run(sae_dir, run_dir)
        source_arch = NATIVE_FORMAT
    else:
        cfg_json, info, cfg, params = _read_folder(sae_dir, run_dir)
        run, step, source_arch = RunInfo(cfg, info["d_in"], 1.0, ""), 0, info["arch"]
    written = write_params_run(run_dir, run, params, step)
    source = {"sae_dir": str(sae_dir.absolute()), "cfg": cfg_json}
    (run_dir / IMPORTED_FROM).write_text(json.dumps(source, indent=2) + "\n")
    written.insert(1, IMPORTED_FROM)
    if (sae_dir / CATALOG_FILE).is_file():
        shutil.copyfile(sae_dir / CATALOG_FILE, run_dir / CATALOG_FILE)
        written.append(CATALOG_FILE)
    return {"arch": run.config.arch, "source_architecture": source_arch, "d_in": run.d_in,
            "d_sae": run.config.width, "k": run.config.k, "run_dir": str(run_dir.absolute()),
            "files": written}


def add_arguments(parser) -> None:
    parser.add_argument("sae_dir", help="folder with cfg.json and sae_weights.safetensors")
    parser.add_argument("run_dir", help="new run directory (for eval, load, ...)")


def run(args) -> dict:
    return import_saelens(args.sae_dir, args.run_dir)
