"""The feature catalog: what `interpret` finds out about each feature, as portable JSON.

A `FeatureCatalog` is a header dict {model, layer, run, n_rows, created, ...} and one plain
dict per feature {id, frequency, count, mean_activation, max_activation, top_examples,
quantile_examples, top_tokens, top_token_ids, activation_histogram, label}; each example is
{tokens, activations, highlight_index, value, row, doc, pos}. `write_catalog` writes it as
`feature_catalog.json` (into a run directory, a dashboard site, an audit); `read_catalog`
reads it back. The readers of single entries (labels, concept texts) live here too, so
dashboard, steer, features, audit and compare share one reading of a catalog.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from sae_jax import files
from sae_jax.errors import UserError

CATALOG_FILE = "feature_catalog.json"
CATALOG_VERSION = 1


@dataclass
class FeatureCatalog:
    """A header dict plus one plain dict per feature (see the module docstring)."""

    header: dict
    features: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"header": self.header, "features": self.features}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False,
                          ensure_ascii=False, separators=None if indent else (",", ":"))

    def write_catalog(self, path: str | os.PathLike) -> str:
        """Writes `path` (a file, or a directory that gets `feature_catalog.json`)."""
        return write_catalog(self, path)

    def feature(self, fid: int) -> dict:
        for f in self.features:
            if f["id"] == fid:
                return f
        raise KeyError(fid)


def _catalog_path(path: str | os.PathLike) -> str:
    path = str(path)
    return path if path.endswith(".json") else files.join(path, CATALOG_FILE)


def write_catalog(catalog: FeatureCatalog, path: str | os.PathLike) -> str:
    """Writes the catalog as JSON; a directory `path` gets `feature_catalog.json`.

    Returns the file written (local path or gs:// URL)."""
    path = _catalog_path(path)
    if not files.is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.write_text(path, catalog.to_json())
    return path


def read_catalog(path: str | os.PathLike) -> FeatureCatalog:
    """Reads a catalog written by `write_catalog` (a file, or a directory holding one)."""
    path = _catalog_path(path)
    raw = files.read_json(path, f"no feature catalog at {path}")
    try:
        return FeatureCatalog(raw["header"], raw["features"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged: {type(e).__name__}: {e}") from None


def find_catalog(run_dir: str | os.PathLike) -> FeatureCatalog | None:
    """The run's catalog (what `sae-jax dashboard` writes into RUN_DIR), or None if it has
    none; a damaged one is a `UserError`."""
    if files.read_text(_catalog_path(run_dir)) is None:
        return None
    return read_catalog(run_dir)


# ----------------------------------------------------------------------------------------
# Writing entries


def json_number(v) -> float:
    """A catalog number: a float with 6 significant digits (small JSON, no numpy types);
    non-finite values become 0.0 (strict JSON has no NaN)."""
    v = float(v)
    return float(f"{v:.6g}") if math.isfinite(v) else 0.0


def token_strings(tokenizer, ids) -> list[str]:
    """WordPiece strings of token `ids` (`<id>` where the tokenizer, or its entry, is
    missing)."""
    if tokenizer is None:
        return [f"<{int(t)}>" for t in ids]
    return [tokenizer.id_to_token(int(t)) or f"<{int(t)}>" for t in ids]


# ----------------------------------------------------------------------------------------
# Reading entries


def feature_label(entry: dict, n_tokens: int = 3) -> str:
    """A feature's catalog label, or else its most frequent tokens joined by " / "."""
    if entry.get("label"):
        return str(entry["label"])
    return " / ".join(str(t) for t, _ in entry.get("top_tokens", [])[:n_tokens])


def labels_from_catalog(catalog: FeatureCatalog | None) -> dict[int, str]:
    """{feature id: `feature_label`} for every feature in a catalog (None: no labels)."""
    if catalog is None:
        return {}
    return {int(f["id"]): feature_label(f) for f in catalog.features}


def catalog_index(run_dir, n_tokens: int = 5) -> dict[int, dict]:
    """`{id: {"label", "top_tokens"}}` from the run's catalog, or {} if it has none."""
    catalog = find_catalog(run_dir)
    if catalog is None:
        return {}
    return {int(f["id"]): {"label": f.get("label"),
                           "top_tokens": [t[0] for t in (f.get("top_tokens") or [])[:n_tokens]]}
            for f in catalog.features}


def detokenize(tokens: list[str], tokenizer) -> str:
    """Catalog context tokens (WordPiece strings) back to text."""
    if tokenizer is None:
        return " ".join(tokens)
    ids = [tokenizer.token_to_id(t) for t in tokens]
    return " ".join(tokens) if None in ids else tokenizer.decode(ids)


def concept_texts(entry: dict, tokenizer) -> list[str]:
    """The texts of a catalog feature's top-activating contexts (what its concept is the
    mean embedding of, in `steer` and the audit)."""
    return [t for t in (detokenize(ex["tokens"], tokenizer).strip()
                        for ex in entry.get("top_examples", [])) if t]
