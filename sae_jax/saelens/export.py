"""`sae-jax export RUN_DIR OUT_DIR`: a run as a SAELens folder (see `sae_jax.saelens` for the
folding of the input scale and the architecture mapping)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from sae_jax import scales
from sae_jax.errors import UserError
from sae_jax.saelens.format import (
    CATALOG_FILE,
    CFG_FILE,
    EXPORT_ARCH,
    SAELENS_VERSION,
    THRESHOLD_ARCHS,
    TRAINING_ARCH,
    TRANSCODER_ARCH,
    WEIGHTS_FILE,
)
from sae_jax.scales import Scale


def saelens_tensors(params: dict, arch: str, input_scale: Scale,
                    target_scale: Scale | None = None) -> dict[str, np.ndarray]:
    """Our params (scaled units) -> SAELens's tensors on raw inputs, float32.

    A transcoder's outputs are divided by its `target_scale` c_t instead of c, and its skip
    map becomes W_skip·c/c_t. A per-source scale (one value per column) folds in the same
    way, column by column: W_enc's row j times c_j, W_dec's and b_dec's column j over c_j."""
    import jax.numpy as jnp

    c = np.asarray(input_scale, np.float64)
    c_out = c if target_scale is None else np.asarray(target_scale, np.float64)
    c_in = c.reshape(-1, 1) if c.ndim else c  # a per-column scale multiplies W_enc's rows
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    out = {"W_enc": p["W_enc"] * c_in, "b_enc": p["b_enc"], "W_dec": p["W_dec"] / c_out,
           "b_dec": p["b_dec"] / c_out}
    if "W_skip" in p:
        out["W_skip"] = p["W_skip"] * (c_in / c_out)
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


TL_HOOKS = {"resid": "hook_resid_post", "attn_out": "hook_attn_out",
            "mlp_out": "hook_mlp_out"}
"""Our causal-LM hook sites as TransformerLens hook names in block L (`blocks.L.<name>`)."""
TL_PAIR_HOOKS = {"mlp": ("ln2.hook_normalized", "hook_mlp_out"),
                 "block": ("hook_resid_pre", "hook_resid_post")}
"""Transcoder pair sites: (input hook, output hook), as SAELens names Gemma Scope's."""


def _store_meta(data_dir: str) -> dict:
    """The store's meta.json, best effort ({} when it is remote, moved or unreadable)."""
    if not data_dir or "://" in data_dir:
        return {}
    try:
        meta = json.loads((Path(data_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _store_provenance(meta: dict) -> dict:
    """The store's producer (model, layer, site, hook), for the export's metadata."""
    return {k: meta[k] for k in ("source", "model", "layer", "site", "hook") if k in meta}


def llm_metadata(meta: dict) -> dict:
    """SAELens's metadata keys for a causal-LM store: the model, the TransformerLens hook
    (`blocks.L.hook_resid_post` ..., a transcoder's input and output hooks), `context_size`
    = the store's seq_len, `prepend_bos` = its sequences start with BOS, and whether special
    tokens were left out of the rows. {} for a MiniLM or imported store (no such hooks)."""
    from sae_jax.lm.hooks import is_causal

    if not is_causal(meta):
        return {}
    layer, pair = int(meta["layer"]), meta.get("pair")
    if pair:
        hook_in, hook_out = TL_PAIR_HOOKS[pair["site"]]
        hooks = {"hook_name": f"blocks.{layer}.{hook_in}",
                 "hook_name_out": f"blocks.{layer}.{hook_out}"}
    else:
        hooks = {"hook_name": f"blocks.{layer}.{TL_HOOKS[meta.get('site', 'resid')]}"}
    return {"model_name": str(meta["model"]), **hooks, "hook_head_index": None,
            "context_size": int(meta["seq_len"]), "prepend_bos": bool(meta.get("bos", False)),
            "exclude_special_tokens": not meta.get("keep_special", False)}


def _check_out_dir(out: Path, force: bool) -> None:
    """An export goes to a new or empty folder, or replaces an earlier export with --force;
    a folder that is not an export is never replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / CFG_FILE).exists():
        raise UserError(f"{out} exists, is not empty and holds no export; "
                        "choose a new directory")
    if not force:
        raise UserError(f"{out} already holds an export; pass --force to replace it "
                        "(the whole folder), or choose a new directory")


def _new_sibling(out: Path, kind: str) -> Path:
    """A new hidden folder next to `out` (same file system, so renames are atomic), with the
    usual permissions (unlike `tempfile.mkdtemp`'s 0700)."""
    path = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.{kind}"
    path.mkdir()
    return path


def _write_folder(out: Path, contents: dict[str, bytes]) -> None:
    """Writes `contents` (name -> bytes) as the folder `out`, replacing any folder there:
    everything goes to a temporary folder next to it first, which is then renamed into place,
    so a failure leaves the old folder as it was and the new one never holds stale files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(out, "tmp")
    try:
        for name, data in contents.items():
            (tmp / name).write_bytes(data)
        if not out.exists():
            os.replace(tmp, out)
            return
        aside = _new_sibling(out, "old")
        os.replace(out, aside / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(aside / out.name, out)
            aside.rmdir()
            raise
        shutil.rmtree(aside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it became `out`


def saelens_supports(arch: str, transcoder: bool) -> bool:
    """Whether SAELens 6.x has an inference class for this run (else: sae_jax's layout)."""
    return arch in EXPORT_ARCH and (not transcoder or EXPORT_ARCH[arch] in TRANSCODER_ARCH)


def _checked_run(run_dir: Path, out: Path, step: int | None, force: bool):
    """`(sae, store meta)` of a run whose params and scales are finite, after the out-dir
    check (so a refused OUT_DIR costs no checkpoint read)."""
    import sae_jax
    from sae_jax.rundir import read_run

    run = read_run(run_dir)
    _check_out_dir(out, force)
    sae = sae_jax.load(run_dir, step)
    both = [sae.input_scale] + ([sae.target_scale] if sae.transcoder else [])
    if not all(np.all(np.isfinite(c)) and np.all(np.asarray(c) > 0) for c in both):
        shown = [scales.to_json(c) for c in both]
        raise UserError(f"run {run_dir} has input/target scale {shown}; they must be finite "
                        "and > 0")
    bad = [k for k, v in sae.params.items() if not np.all(np.isfinite(np.asarray(v)))]
    if bad:
        raise UserError(f"run {run_dir} step {sae.step} has non-finite values in "
                        f"{', '.join(sorted(bad))}; nothing exported")
    return sae, _store_meta(run.data_dir)


def _details(sae, meta: dict) -> dict:
    """Who wrote the export, from which step, config and store."""
    import sae_jax

    details = {"library": "sae_jax", "sae_jax_version": sae_jax.__version__,
               "arch": sae.config.arch, "input_scale": scales.to_json(sae.input_scale),
               "step": sae.step, "config": sae.config.to_dict()}
    if sae.transcoder:
        details["target_scale"] = scales.to_json(sae.target_scale)
    if _store_provenance(meta):
        details["data"] = _store_provenance(meta)
    return details


def _write_export(run_dir: Path, out: Path, cfg: dict, tensors: dict) -> list[str]:
    """cfg.json, the weights and the run's feature catalog, as one new folder."""
    import safetensors.numpy

    contents = {CFG_FILE: (json.dumps(cfg, indent=2) + "\n").encode(),
                WEIGHTS_FILE: safetensors.numpy.save(tensors)}
    catalog = run_dir / CATALOG_FILE
    if catalog.is_file():
        contents[CATALOG_FILE] = catalog.read_bytes()
    _write_folder(out, contents)
    return list(contents)


def _result(fmt: str, architecture: str, sae, out: Path, files: list[str], llm: dict) -> dict:
    return {"format": fmt, "architecture": architecture, "training_architecture": sae.config.arch,
            "d_in": sae.d_in, "d_sae": sae.width, "input_scale": scales.to_json(sae.input_scale),
            "step": sae.step, "out_dir": str(out.absolute()), "files": files,
            "hook_name": llm.get("hook_name")}


def export_saelens(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   step: int | None = None, force: bool = False) -> dict:
    """Writes the run's SAE (latest or `step`'s checkpoint) as a SAELens 6.x folder.

    An existing export in `out_dir` is refused unless `force`, which replaces the whole
    folder (no stale file of the old export survives); the new folder appears at once.

    A run on a causal-LM store also names its model and TransformerLens hook in
    `metadata` (`llm_metadata`), so SAELens users can attach it to their model.

    Returns:
      `{"format": "saelens", "architecture", "training_architecture", "d_in", "d_sae",
      "input_scale", "step", "out_dir", "files", "hook_name"}` (files: names inside out_dir;
      hook_name: the TransformerLens hook, or None for a store without one).

    Raises:
      UserError: no run / checkpoint, an architecture SAELens cannot load (crosscoders: use
        `export_native`), an unusable out_dir, non-finite params or scale.
    """
    from sae_jax.rundir import read_run

    run_dir, out = Path(run_dir), Path(out_dir)
    arch = read_run(run_dir).config.arch
    if arch not in EXPORT_ARCH:
        raise UserError(f"no SAELens export for arch={arch} (SAELens has no crosscoder or "
                        "cross-layer transcoder class); export with --format sae_jax, which "
                        "sae_jax.load reads (docs/interop.md)")
    sae, meta = _checked_run(run_dir, out, step, force)
    params = {k: np.asarray(v) for k, v in sae.params.items()}
    tensors = saelens_tensors(params, arch, sae.input_scale, sae.target_scale)
    details = _details(sae, meta)
    if arch in THRESHOLD_ARCHS:
        details["threshold"] = float(params["threshold"])
    transcoder = (sae.d_out, "W_skip" in params) if sae.transcoder else None
    cfg = saelens_cfg(arch, sae.d_in, sae.width, sae.config.k, details, transcoder)
    llm = llm_metadata(meta)
    cfg["metadata"].update(llm)
    if "hook_name_out" in llm:  # TranscoderConfig's own fields (SAELens reads them there)
        cfg.update(hook_name_out=llm["hook_name_out"], hook_layer_out=int(meta["layer"]))
    written = _write_export(run_dir, out, cfg, tensors)
    return _result("saelens", cfg["architecture"], sae, out, written, llm)


def export_native(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  step: int | None = None, force: bool = False) -> dict:
    """Writes any run (crosscoders, CLTs, and every other architecture) in sae_jax's own
    layout (`sae_jax.saelens.native`), which `sae_jax.load(out_dir)` reads back with the
    run's exact encode/decode. Same folder rules, result keys and errors as `export_saelens`
    (`format` is "sae_jax", `architecture` our arch)."""
    from sae_jax.saelens.native import native_cfg, native_tensors, source_entries

    run_dir, out = Path(run_dir), Path(out_dir)
    sae, meta = _checked_run(run_dir, out, step, force)
    tensors = native_tensors({k: np.asarray(v) for k, v in sae.params.items()},
                             sae.input_scale, sae.target_scale)
    sources = (source_entries(sae.config.sources, meta.get("sources"))
               if sae.config.sources else None)
    llm = llm_metadata(meta)
    cfg = native_cfg(sae, tensors, sources, {**_details(sae, meta), **llm})
    written = _write_export(run_dir, out, cfg, tensors)
    return _result("sae_jax", sae.config.arch, sae, out, written, llm)


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
               step: int | None = None, force: bool = False, fmt: str = "auto") -> dict:
    """`sae-jax export`: `fmt` "saelens", "sae_jax", or "auto" (SAELens's format where SAELens
    can load the architecture, else sae_jax's)."""
    from sae_jax.rundir import read_run

    if fmt == "auto":
        config = read_run(run_dir).config
        fmt = "saelens" if saelens_supports(config.arch, config.transcoder) else "sae_jax"
    return (export_saelens if fmt == "saelens" else export_native)(run_dir, out_dir, step,
                                                                    force)


def add_arguments(parser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--format", choices=("auto", "saelens", "sae_jax"), default="auto",
                        help="saelens: SAELens 6.x's folder; sae_jax: our own layout, for "
                             "every arch (crosscoders, CLTs); auto (default): saelens where "
                             "SAELens can load the arch, else sae_jax")
    parser.add_argument("--step", type=int, help="checkpoint to export (default: the latest)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier export in OUT_DIR (the whole folder)")


def run(args) -> dict:
    return export_run(args.run_dir, args.out_dir, args.step, args.force, args.format)
