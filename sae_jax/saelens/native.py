"""sae_jax's own export layout, for runs SAELens cannot load (crosscoders, cross-layer
transcoders, a TopK transcoder): `cfg.json` + `sae_weights.safetensors`, like a SAELens folder.

SAELens (6.54.12, the newest release checked) registers no crosscoder or CLT class; it reads
a CLT only layer by layer, as a single-layer transcoder with the per-target decoders summed
(docs/interop.md). So this layout stores what our loader needs and a reader in any
framework can follow, generically over the architecture's params:

- `sae_weights.safetensors`: every param of the run by its sae_jax name (`W_enc (d_in, F)`,
  `b_enc (F,)`, `W_dec (F, d_out)`, `b_dec (d_out,)`, and the architecture's extras, e.g.
  BatchTopK's `threshold ()`), exactly as trained, in scaled units; plus the scales as float64
  tensors, `input_scale` (and a transcoder's `target_scale`): `()` for one scale, a `(d_in,)`
  (`(d_out,)`) vector, one value per column, for a run's per-source scales
  (`sae_jax.scales`). Recording the scales rather
  than folding them keeps the params bitwise the run's, whatever their names and units.
- `cfg.json`: `format: "sae_jax"`, `format_version`, `architecture`, `d_in`, `d_sae`,
  `d_out`, `sources` (each source's `name`, width `d`, column `offset` in a row, and
  `model`/`layer`/`site` when the store recorded them), `tensors` (name -> shape),
  `scales` (the names of the scale tensors), `step`, the full training `config` and
  `metadata` (producer, store provenance, the TransformerLens hook of a causal-LM store).

A crosscoder's source s decodes to columns `offset_s : offset_s + d_s` of `W_dec` and
`b_dec`; on raw activations x (the sources side by side), with c = input_scale and
c_out = target_scale (else c): `pre = (c·x − b_dec) @ W_enc + b_enc` (a transcoder
subtracts nothing), f = the architecture's activation of pre, `x̂ = (f @ W_dec + b_dec) / c_out`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sae_jax.errors import UserError
from sae_jax.saelens.format import CFG_FILE, NATIVE_FORMAT, WEIGHTS_FILE

FORMAT = NATIVE_FORMAT
FORMAT_VERSION = 1
SCALE_TENSORS = ("input_scale", "target_scale")


def native_tensors(params: dict, input_scale, target_scale=None) -> dict[str, np.ndarray]:
    """The weights file's tensors: the params as they are, and the scales as float64 arrays."""
    clash = sorted(set(params) & set(SCALE_TENSORS))
    assert not clash, f"params named like a scale tensor: {clash}"
    out = {k: np.array(v, order="C") for k, v in params.items()}  # 0-d stays 0-d
    out["input_scale"] = np.asarray(input_scale, np.float64)
    if target_scale is not None:
        out["target_scale"] = np.asarray(target_scale, np.float64)
    return out


def source_entries(widths: tuple[int, ...], meta_sources) -> list[dict]:
    """`[{"name", "d", "offset", ...}]` for a row of sources of `widths`: names and provenance
    from the store's `meta["sources"]` when they match, else A, B, ..."""
    known = meta_sources if isinstance(meta_sources, list) and len(meta_sources) == len(
        widths) else [{}] * len(widths)
    out, offset = [], 0
    for i, (d, src) in enumerate(zip(widths, known, strict=True)):
        src = src if isinstance(src, dict) else {}
        entry = {"name": str(src.get("name") or chr(ord("A") + i)), "d": int(d),
                 "offset": offset}
        entry.update({k: src[k] for k in ("model", "hash", "layer", "site")
                      if src.get(k) is not None})
        out.append(entry)
        offset += int(d)
    return out


def native_cfg(sae, tensors: dict, sources: list[dict] | None, metadata: dict) -> dict:
    """cfg.json for an `SAE` (see the module docstring)."""
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION,
           "architecture": sae.config.arch, "d_in": sae.d_in, "d_sae": sae.width,
           "d_out": sae.d_out, "transcoder": sae.transcoder}
    if sources:
        cfg["sources"] = sources
    cfg.update(tensors={k: list(v.shape) for k, v in tensors.items()
                        if k not in SCALE_TENSORS},
               scales=[k for k in SCALE_TENSORS if k in tensors], step=int(sae.step),
               config=sae.config.to_dict(), metadata=metadata)
    return cfg


def is_native_dir(path) -> bool:
    """Whether `path` is a local folder with an export's cfg.json (and no run's config.json),
    so `sae_jax.load` reads it as an export."""
    path = Path(path)
    return "://" not in str(path) and (path / CFG_FILE).is_file() and not (
        path / "config.json").exists()


def _scale(tensors: dict, name: str, path: Path, width: int | None):
    """A scale tensor as the run had it: `()` -> a float, `(width,)` -> per-column floats
    (`sae_jax.scales`)."""
    if name not in tensors:
        return None
    value = np.asarray(tensors.pop(name), np.float64)
    if value.size == 0 or not np.all(np.isfinite(value)) or not np.all(value > 0):
        raise UserError(f"{path}: {name} must be finite and > 0, got {value}")
    if value.ndim == 0:
        return float(value)
    if value.shape != (width,):
        raise UserError(f"{path}: {name} has shape {list(value.shape)}; expected [] or "
                        f"[{width}] (one value per column)")
    return tuple(float(v) for v in value)


def read_native(path) -> dict:
    """A checked export folder: `{"config", "d_in", "d_out", "params" (numpy), "input_scale",
    "target_scale", "step", "cfg"}`. The params' names and shapes are checked against the
    architecture by the caller (`sae_jax.sae.load_export`).

    Raises:
      UserError: a missing or damaged cfg.json or weights file, a SAELens folder, a newer
        format version, non-finite values.
    """
    from sae_jax.config import config_from_dict
    from sae_jax.data.safetensors_io import read_safetensors

    path = Path(path)
    cfg_path, weights = path / CFG_FILE, path / WEIGHTS_FILE
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {cfg_path}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise UserError(f"{path} is not a sae_jax export (no \"format\": \"sae_jax\" in "
                        f"{CFG_FILE}); a SAELens folder loads with sae_jax.saelens.load_saelens "
                        "or `sae-jax import-sae`")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{cfg_path}: format_version {cfg.get('format_version')!r}; this "
                        f"sae_jax reads version {FORMAT_VERSION}")
    if not weights.is_file():
        raise UserError(f"{path} has no {WEIGHTS_FILE}")
    try:
        config = config_from_dict(cfg["config"])
        d_in, step = int(cfg["d_in"]), int(cfg["step"])
        d_out = int(cfg["d_out"]) if cfg.get("transcoder") else None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path} is damaged: {type(e).__name__}: {e}") from None
    tensors = read_safetensors(weights)
    input_scale = _scale(tensors, "input_scale", weights, d_in)
    if input_scale is None:
        raise UserError(f"{weights}: no input_scale tensor")
    target_scale = _scale(tensors, "target_scale", weights, d_out)
    if (target_scale is None) != (d_out is None):
        raise UserError(f"{weights}: target_scale must be present exactly for a transcoder")
    bad = sorted(k for k, v in tensors.items() if not np.all(np.isfinite(v)))
    if bad:
        raise UserError(f"{weights}: non-finite values in {', '.join(bad)}")
    return {"config": config, "d_in": d_in, "d_out": d_out, "params": tensors,
            "input_scale": input_scale, "target_scale": target_scale, "step": step,
            "cfg": cfg}
