"""The dashboard section of `sae-jax diff RUN DATA`: each exclusive latent with its top
examples and what each model contributes to them.

A crosscoder latent that writes only to model B (B-only) says "B has this and A has not";
the reader's next question is *on which tokens*, and *does A's activation feed it at all*.
So for every example row the site shows, besides the token context (the store's tokens,
as `sae-jax dashboard` shows them), the latent's pre-activation split by source,

    pre_i = Σ_s (c·x_s − b_dec,s) · W_enc[s, i] + b_enc,i  =  pre_A + pre_B + bias

(`bias` = b_enc,i plus any other source's term), and the norm of its decoder write into
each model, f_i · ‖W_dec[i, s]‖ / c (raw activation units, c the run's input scale). A
B-only latent whose pre-activation comes mostly from A's term reads something A has and
writes it only into B: a change in how B *uses* a shared input, rather than a new input.

The site is the ordinary dashboard (`dashboard.write_site`: index, feature pages, the same
assets) over a catalog of the shown latents (at most `max_latents` per class, the most
exclusive first), plus `diff.js` (`window.SAE_DIFF`: counts, classes and the per-example
split) and `diff.png`; `app.js` draws the Model diff section and the per-example lines.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sae_jax import files
from sae_jax.analysis.catalog import json_number
from sae_jax.analysis.dashboard import DIFF_JS, write_site
from sae_jax.analysis.interpret import build_catalog, read_ranges
from sae_jax.data.store import ROWS, open_store
from sae_jax.errors import UserError

EXCLUSIVE_CLASSES = ("A-only", "B-only")
DEFAULT_MAX_LATENTS = 100
SITE_DIR = "dashboard"


def shown_latents(result: dict, max_latents: int) -> dict[str, list[int]]:
    """Per exclusive class, at most `max_latents` latents, the most exclusive first (r
    nearest its end, then id)."""
    r = np.asarray(result["relative_norm"], float)
    out = {}
    for cls in EXCLUSIVE_CLASSES:
        ids = np.asarray(result["latents"][cls], np.int64)
        dist = r[ids] if cls == "A-only" else 1.0 - r[ids]
        out[cls] = ids[np.lexsort((ids, dist))][:max_latents].tolist()
    return out


def contributions(params: dict, input_scale, columns: tuple[tuple[int, int], ...],
                  x: np.ndarray, latents: np.ndarray, acts: np.ndarray) -> dict:
    """Per example p (raw row `x[p]`, latent `latents[p]`, its activation `acts[p]`): the
    pre-activation terms of sources A and B, the rest (`bias`), and the decoder write norms
    into A and B (module docstring). `columns` = ((lo_A, hi_A), (lo_B, hi_B)); `input_scale`
    a float or the per-column multiplier (`SAE.input_multiplier`, per-source scales)."""
    W_enc = np.asarray(params["W_enc"], np.float64)[:, latents]          # (D, n)
    scale = np.broadcast_to(np.asarray(input_scale, np.float64), W_enc.shape[:1])
    centred = np.asarray(x, np.float64) * scale - np.asarray(params["b_dec"], np.float64)
    terms = centred * W_enc.T                                             # (n, D)
    pre = terms.sum(1) + np.asarray(params["b_enc"], np.float64)[latents]
    W_dec = np.asarray(params["W_dec"], np.float64)[latents]              # (n, D)
    out = {}
    for side, (lo, hi) in zip("ab", columns):
        out[f"pre_{side}"] = terms[:, lo:hi].sum(1)
        out[f"write_{side}"] = acts * np.linalg.norm(W_dec[:, lo:hi] / scale[lo:hi], axis=1)
    out["bias"] = pre - out["pre_a"] - out["pre_b"]
    return out


def example_splits(sae, catalog, columns) -> dict[int, list[dict]]:
    """{latent: [{row, activation, pre_a, pre_b, bias, write_a, write_b}, ...]} for every
    example (top and quantile) of every latent in the catalog, rows read once."""
    pairs = []
    for f in catalog.features:
        exs = f["top_examples"] + [e for g in f["quantile_examples"] for e in g["examples"]]
        pairs += [(f["id"], e["row"], e["value"]) for e in exs]
    if not pairs:
        return {}
    lat, rows, acts = (np.array(v) for v in zip(*pairs))
    needed, inverse = np.unique(rows, return_inverse=True)
    x = read_ranges(open_store(catalog.header["data_dir"]), ROWS, 0, needed)[inverse]
    split = contributions(sae.params, sae.input_multiplier, columns, x, lat.astype(np.int64),
                          acts.astype(np.float64))
    out: dict[int, list[dict]] = {}
    for p, (i, row, act) in enumerate(pairs):
        entry = {"row": int(row), "activation": json_number(act)}
        entry.update({k: json_number(v[p]) for k, v in split.items()})
        if entry not in out.setdefault(int(i), []):
            out[int(i)].append(entry)
    return out


def diff_payload(result: dict, shown: dict[str, list[int]], splits: dict) -> dict:
    """What `diff.js` holds: the diff's counts and thresholds, and per shown latent its
    class, relative norm, cosine, decoder norms and per-example split."""
    cos = result["cosine"]
    latents = {}
    for cls, ids in shown.items():
        for i in ids:
            latents[str(i)] = {"class": cls, "r": json_number(result["relative_norm"][i]),
                               "cosine": None if cos is None else json_number(cos[i]),
                               "norm_a": json_number(result["decoder_norm_a"][i]),
                               "norm_b": json_number(result["decoder_norm_b"][i]),
                               "examples": splits.get(i, [])}
    keep = ("run", "source_a", "source_b", "width", "thresholds", "counts",
            "median_shared_cosine")
    return {**{k: result[k] for k in keep}, "shown": shown, "latents": latents}


def write_diff_site(sae, result: dict, data_dir: str, out_dir: str | Path, png: bytes, *,
                    max_latents: int = DEFAULT_MAX_LATENTS, top_k: int = 10,
                    batch_size: int = 4096, progress: bool = False) -> dict:
    """Writes the dashboard section (module docstring) for `result` (`diff.diff_run`'s) into
    `out_dir`; returns `index`, the number of latents shown and the seconds taken."""
    t0 = time.perf_counter()
    if files.is_remote(str(out_dir)):
        raise UserError("the diff dashboard is written to a local directory; give a local "
                        "--out")
    if max_latents < 1:
        raise UserError(f"--max-latents must be at least 1, got {max_latents}")
    store = open_store(data_dir)
    if store.d_in != sae.d_in:
        raise UserError(f"{data_dir} has rows of width {store.d_in}, but the crosscoder reads "
                        f"{sae.d_in}: give the two-source store it was trained on")
    shown = shown_latents(result, max_latents)
    ids = sorted(shown["A-only"] + shown["B-only"])
    if ids:
        catalog = build_catalog(sae, store.span(), features=ids, top_k=top_k,
                                batch_size=batch_size, run=result["run"], progress=progress)
    else:  # nothing exclusive: an index with the counts, no feature pages
        from sae_jax.analysis.catalog import FeatureCatalog

        catalog = FeatureCatalog({"run": result["run"], "n_rows": store.n_rows,
                                  "data_dir": str(store.path), "width": result["width"],
                                  "histogram": {"log10_lo": -4, "log10_hi": 4, "bins": 64}})
    columns = tuple(tuple(c) for c in result["source_columns"])
    payload = diff_payload(result, shown, example_splits(sae, catalog, columns) if ids else {})
    site = write_site(catalog, out_dir, diff=payload)
    files.write_bytes(Path(out_dir) / "diff.png", png)
    return {"index": site["index"], "shown": {k: len(v) for k, v in shown.items()},
            "diff_js": str(Path(out_dir) / DIFF_JS),
            "seconds": round(time.perf_counter() - t0, 2)}

