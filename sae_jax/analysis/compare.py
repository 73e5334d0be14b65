"""Drift between two SAEs: which features they share, and which appear, vanish or split.

`compare(RUN_A, RUN_B, DATA)` (the `sae-jax compare` command) matches the two dictionaries
by decoder direction (`matching.match_features`, where the categories are defined), adds how
the matched features fire on shared data, and writes `compare.json` plus `compare.png`.

The activation correlation of matched features on shared rows is
`correlation.activation_correlation`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from sae_jax import files, plots
from sae_jax.analysis.catalog import catalog_index
from sae_jax.analysis.correlation import DEFAULT_MAX_ROWS, activation_correlation
from sae_jax.analysis.matching import (
    DEFAULT_THRESHOLD,
    DENSE_MAX_ENTRIES,
    HIST_EDGES,
    cosine_histogram,
    match_features,
)
from sae_jax.data.store import TOKEN_IDS, open_store
from sae_jax.errors import UserError

COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"


# ----------------------------------------------------------------------------------------
# Putting it together


def _mean(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(v.mean()) if len(v) else float("nan")


def _median(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(np.median(v)) if len(v) else float("nan")


def _activation_summary(act: dict, match: dict) -> dict:
    corr = act["corr_a"]
    matched = match["per_feature"]["a"]["category"] == "matched"
    out = {"n_rows": act["n_rows"],
           "corr_matched_mean": _mean(corr[matched]), "corr_matched_median": _median(corr[matched]),
           "corr_mean": _mean(corr), "corr_median": _median(corr),
           "n_corr_defined": int(np.isfinite(corr).sum()),
           "dead_a": int((act["frequency_a"] == 0).sum()),
           "dead_b": int((act["frequency_b"] == 0).sum()),
           "corr_hist": {"bin_edges": HIST_EDGES.tolist(), "one_to_one": cosine_histogram(corr),
                         "matched": cosine_histogram(corr[matched])}}
    if "best_corr_a" in act:
        out["best_corr_mean_a"] = _mean(act["best_corr_a"])
        out["best_corr_mean_b"] = _mean(act["best_corr_b"])
        out["corr_hist"]["best_a"] = cosine_histogram(act["best_corr_a"])
        out["corr_hist"]["best_b"] = cosine_histogram(act["best_corr_b"])
    return out


def _per_feature_activation(act: dict, partner_a: np.ndarray, width_b: int) -> dict:
    """Activation arrays keyed like `per_feature`: {"a": {...}, "b": {...}}."""
    corr_b = np.full(width_b, np.nan)
    has = partner_a >= 0
    corr_b[partner_a[has]] = act["corr_a"][has]
    out = {"a": {"frequency": act["frequency_a"], "corr": act["corr_a"]},
           "b": {"frequency": act["frequency_b"], "corr": corr_b}}
    for side in ("a", "b"):
        if f"best_corr_{side}" in act:
            out[side]["best_corr"] = act[f"best_corr_{side}"]
            out[side]["best_corr_partner"] = act[f"best_corr_partner_{side}"]
    return out


def _describe(fid: int, arrays: dict, catalog: dict) -> dict:
    """One feature as an example: its partner, cosines, activation numbers, catalog info."""
    d = {"id": int(fid)}
    keys = ["best", "best_partner", "frequency", "best_corr"]
    if arrays["partner"][fid] >= 0:
        keys = ["partner", "cosine", "corr", *keys]
    for key in keys:
        if key in arrays:
            v = arrays[key][fid]
            d[key] = int(v) if np.issubdtype(type(v), np.integer) else float(v)
    d.update(catalog.get(int(fid), {}))
    return d


def _examples(per_feature: dict, several: dict, side: str, other: str, lone: str, mixed: str,
              n: int, catalogs: dict) -> dict:
    """The best `n` examples of a side's lone features (vanished/appeared: most frequent
    first, else lowest best cosine) and mixed ones (split/merged: best fit first; each part
    lists its NNLS `coef` and its `cosine_to_whole` with the mixed feature)."""
    arrays = per_feature[side]
    ids = np.flatnonzero(arrays["category"] == lone)
    if "frequency" in arrays:
        order = np.lexsort((arrays["best"][ids], -arrays["frequency"][ids]))
    else:
        order = np.argsort(arrays["best"][ids], kind="stable")
    lone_examples = [_describe(i, arrays, catalogs[side]) for i in ids[order][:n]]
    ranked = sorted(several.items(), key=lambda kv: (-kv[1]["fit_cosine"], kv[0]))[:n]
    mixed_examples = []
    for fid, info in ranked:
        d = _describe(fid, arrays, catalogs[side])
        d["fit_cosine"] = info["fit_cosine"]
        d["parts"] = [{**_describe(p, per_feature[other], catalogs[other]), "coef": coef,
                       "cosine_to_whole": cos} for p, coef, cos in info["parts"]]
        mixed_examples.append(d)
    return {lone: lone_examples, mixed: mixed_examples}


def _directions(sae):
    """The decoder rows to match: as trained for one input scale (a positive factor, which
    leaves every direction as it is), in raw units for a per-source scale (which does not)."""
    scale = sae.output_scale
    return np.asarray(sae.params["W_dec"]) / scale if np.ndim(scale) else sae.params["W_dec"]


def compare_saes(sae_a, sae_b, rows=None, rows_b=None, *, threshold: float = DEFAULT_THRESHOLD,
                 max_rows: int = DEFAULT_MAX_ROWS, batch_size: int = 2048, n_examples: int = 10,
                 catalog_a: dict | None = None, catalog_b: dict | None = None,
                 **match_kwargs) -> dict:
    """`match_features` on two loaded SAEs, plus activation correlation if `rows` are given.

    Args:
      sae_a, sae_b: `sae_jax.sae.SAE`s (e.g. from `sae_jax.load`).
      rows, rows_b: see `activation_correlation` (None: decoder comparison only).
      threshold, match_kwargs: see `match_features`.
      max_rows, batch_size: see `activation_correlation`.
      n_examples: examples listed per category.
      catalog_a, catalog_b: `catalog_index` of each run, to label the examples.

    Returns:
      The `match_features` summary, `activation` (summary or None), `examples` (`vanished`,
      `split`, `appeared`, `merged`: lists of feature dicts) and `per_feature` arrays.
    """
    match = match_features(_directions(sae_a), _directions(sae_b), threshold, **match_kwargs)
    per_feature = match["per_feature"]
    activation = None
    if rows is not None:
        f_a, f_b = match["width_a"], match["width_b"]
        act = activation_correlation(
            sae_a, sae_b, rows, per_feature["a"]["partner"], rows_b, max_rows=max_rows,
            batch_size=batch_size,
            cross=f_a * f_b <= match_kwargs.get("dense_max_entries", DENSE_MAX_ENTRIES))
        activation = _activation_summary(act, match)
        for side, extra in _per_feature_activation(act, per_feature["a"]["partner"],
                                                   f_b).items():
            per_feature[side].update(extra)
    catalogs = {"a": catalog_a or {}, "b": catalog_b or {}}
    examples = {**_examples(per_feature, match["splits"], "a", "b", "vanished", "split",
                            n_examples, catalogs),
                **_examples(per_feature, match["merges"], "b", "a", "appeared", "merged",
                            n_examples, catalogs)}
    return {**match, "activation": activation, "examples": examples,
            "per_feature": per_feature}


def _bounded_rows(store, split: str, holdout: float):
    if split == "all":
        return store.span()
    if split == "heldout":
        return store.split(holdout)[1]
    raise UserError(f"split must be heldout or all, got {split!r}")


def _check_same_tokens(rows, rows_b, n: int) -> None:
    """Two stores for one comparison must hold the same tokens, row for row."""
    a, b = rows.store, rows_b.store
    if a.n_rows != b.n_rows:
        raise UserError(f"{a.path} has {a.n_rows} rows but {b.path} has {b.n_rows}: DATA_B "
                        "must hold activations of the same tokens as DATA")
    if a.token_ids is not None and b.token_ids is not None:
        ids_a = a.read(TOKEN_IDS, rows.start, rows.start + n)
        ids_b = b.read(TOKEN_IDS, rows_b.start, rows_b.start + n)
        if not np.array_equal(ids_a, ids_b):
            raise UserError(f"{a.path} and {b.path} hold different tokens: DATA_B must hold "
                            "activations of the same tokens as DATA")


def compare(run_a, run_b, data_dir=None, data_b=None, *, threshold: float = DEFAULT_THRESHOLD,
            max_rows: int = DEFAULT_MAX_ROWS, split: str = "heldout", batch_size: int = 2048,
            n_examples: int = 10, **match_kwargs) -> dict:
    """`sae-jax compare RUN_A RUN_B [DATA]`: drift between two trained runs.

    Args:
      run_a, run_b: run directories (`sae_jax.load`).
      data_dir: a store of the SAEs' d_in for activation correlation (None: decoders only).
      data_b: B's activations of the same tokens (default: `data_dir`), e.g. the same corpus
        harvested from a fine-tuned model.
      threshold: cosine for a match (module docstring).
      max_rows: rows read, from the start of `split`.
      split: "heldout" (the store's tail, by A's `holdout`) or "all".
      batch_size, n_examples, match_kwargs: see `compare_saes`.

    Returns:
      `compare_saes`'s result, preceded by `run_a`, `run_b`, `step_a`, `step_b`, `data`,
      `data_b` and `split`.
    """
    from sae_jax.sae import load

    if data_b is not None and data_dir is None:
        raise UserError("DATA_B needs DATA: give the store for A too")
    if max_rows < 2:
        raise UserError(f"max_rows must be at least 2, got {max_rows}")
    sae_a, sae_b = load(run_a), load(run_b)
    rows = rows_b = None
    if data_dir is not None:
        rows = _bounded_rows(open_store(data_dir), split, sae_a.config.holdout)
        if data_b is not None:
            rows_b = _bounded_rows(open_store(data_b), split, sae_a.config.holdout)
            _check_same_tokens(rows, rows_b, min(len(rows), max_rows))
    result = compare_saes(sae_a, sae_b, rows, rows_b, threshold=threshold, max_rows=max_rows,
                          batch_size=batch_size, n_examples=n_examples,
                          catalog_a=catalog_index(run_a), catalog_b=catalog_index(run_b),
                          **match_kwargs)
    return {"run_a": str(run_a), "run_b": str(run_b), "step_a": sae_a.step,
            "step_b": sae_b.step, "data": None if data_dir is None else str(data_dir),
            "data_b": None if data_b is None else str(data_b),
            "split": None if data_dir is None else split, **result}


# ----------------------------------------------------------------------------------------
# Output


def summary(result: dict) -> dict:
    """The result without per-feature arrays and histograms, as strict JSON values (NaN ->
    None): what the CLI prints."""

    drop = {"per_feature", "splits", "merges", "cosine_hist"}
    out = {k: v for k, v in result.items() if k not in drop}
    if result.get("activation"):
        out["activation"] = {k: v for k, v in result["activation"].items() if k != "corr_hist"}
    return files.json_safe(out)


def _run_name(run, default: str) -> str:
    return default if run is None else str(run).rstrip("/").rsplit("/", 1)[-1]


def plot_compare(result: dict) -> bytes:
    """Histograms of one-to-one and best cosines (and of activation correlations), PNG."""
    panels = [("cosine_hist", "decoder cosine", result["cosine_hist"])]
    if result.get("activation"):
        panels.append(("corr_hist", "activation correlation (Pearson)",
                       result["activation"]["corr_hist"]))
    fig, axes = plots.figure(7 * len(panels), 4, len(panels))
    for n, ((_, xlabel, hist), ax) in enumerate(zip(panels, axes)):
        edges = np.asarray(hist["bin_edges"])
        ax.bar(edges[:-1], hist["one_to_one"], width=np.diff(edges), align="edge",
               color="tab:blue", edgecolor="white", label="one-to-one pairs")
        for key, color, label in (("best_a", "tab:orange", "best partner, A's features"),
                                  ("best_b", "tab:green", "best partner, B's features")):
            if key in hist:
                ax.stairs(hist[key], edges, color=color, linewidth=1.5, label=label)
        used = [e for e, c in zip(edges, np.sum([v for k, v in hist.items()
                                                 if k != "bin_edges"], 0)) if c]
        ax.set_xlim(min([0.0, *used]), 1.0)
        if n == 0:
            ax.axvline(result["threshold"], color="gray", linestyle="--", linewidth=1,
                       label=f"threshold ({result['threshold']:g})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("features")
        ax.legend(fontsize=8)
    name_a, name_b = (_run_name(result.get(f"run_{s}"), s.upper()) for s in "ab")
    title = (f"A: {name_a} ({result['width_a']} features)  vs  B: {name_b} "
             f"({result['width_b']}): {result['n_matched']} matched pairs (cos ≥ "
             f"{result['threshold']:g}) = {result['matched_frac_a']:.1%} of A")
    fig.suptitle(title, fontsize=9)
    return plots.png(fig)


def write_compare_artifacts(result: dict, out_dir) -> dict:
    """Writes `out_dir/compare.json` (everything, strict JSON) and `out_dir/compare.png`."""

    out = str(out_dir).rstrip("/")
    text = files.strict_json(result) + "\n"
    files.write_bytes(files.join(out, COMPARE_JSON), text.encode())
    files.write_bytes(files.join(out, COMPARE_PNG), plot_compare(result))
    return {"json": files.join(out, COMPARE_JSON), "png": files.join(out, COMPARE_PNG)}


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def format_summary(result: dict) -> str:
    """A few readable lines for stderr."""
    c = result["counts"]
    lines = [
        f"A = {result.get('run_a', 'A')} ({result['width_a']} features), B = "
        f"{result.get('run_b', 'B')} ({result['width_b']}), d_in {result['d_in']}, "
        f"assignment {result['assignment']}",
        f"matched (cos >= {result['threshold']:g}): {result['n_matched']} pairs = "
        f"{_pct(result['matched_frac_a'])} of A, {_pct(result['matched_frac_b'])} of B",
        "matched fraction of A at " + ", ".join(
            f"{t}: {_pct(v['a'])}" for t, v in result["matched_frac_at"].items()),
        f"one-to-one cosine: mean {result['matched_cosine_mean']:.3f}, median "
        f"{result['matched_cosine_median']:.3f}",
        "A: " + ", ".join(f"{k[:-2]} {v}" for k, v in c.items() if k.endswith("_a")),
        "B: " + ", ".join(f"{k[:-2]} {v}" for k, v in c.items() if k.endswith("_b")),
    ]
    act = result.get("activation")
    if act:
        lines.append(f"activation correlation over {act['n_rows']} rows: matched pairs mean "
                     f"{act['corr_matched_mean']:.3f} (median {act['corr_matched_median']:.3f})"
                     f", all pairs mean {act['corr_mean']:.3f}; dead A {act['dead_a']}, "
                     f"dead B {act['dead_b']}")
    for key in ("vanished", "appeared", "split", "merged"):
        ex = result["examples"].get(key) or []
        if ex:
            lines.append(f"{key}: " + ", ".join(
                f"#{e['id']}" + (f" {e['top_tokens'][:3]}" if e.get("top_tokens") else "")
                for e in ex[:5]))
    return "\n".join(lines)


def default_out_dir(run_a, run_b) -> str:
    """`RUN_A/compare/<name of RUN_B>`."""
    return files.join(str(run_a), "compare", _run_name(run_b, "B"))


def check_out_dir(out_dir) -> None:
    """Refuses a local `--out` that is (or lies inside) an existing file."""
    if files.is_remote(str(out_dir)):
        return
    path = Path(out_dir).absolute()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"--out {out_dir}: {p} is a file, not a directory; give a "
                                "directory for compare.json and compare.png")
            return


def add_arguments(parser) -> None:
    """`sae-jax compare RUN_A RUN_B [DATA] [options]`; run with `run(args)`."""
    parser.add_argument("run_a", help="first run directory (A)")
    parser.add_argument("run_b", help="second run directory (B), same d_in as A")
    parser.add_argument("data_dir", nargs="?", default=None,
                        help="a store for activation correlation (optional)")
    parser.add_argument("--data-b", default=None,
                        help="B's activations of the same tokens (default: DATA), e.g. the "
                             "corpus harvested from a fine-tuned model")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"decoder cosine for a match (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                        help=f"rows of DATA to correlate on (default {DEFAULT_MAX_ROWS})")
    parser.add_argument("--split", choices=("heldout", "all"), default="heldout",
                        help="rows of DATA to use (default: the held-out tail)")
    parser.add_argument("--examples", type=int, default=10,
                        help="examples listed per category (default 10)")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--out", default=None,
                        help="where to write compare.json and compare.png "
                             "(default: RUN_A/compare/<name of RUN_B>)")


def run(args) -> dict:
    """Runs `sae-jax compare` from parsed `add_arguments` arguments; returns `summary`."""
    if args.batch_size < 1 or args.examples < 0:
        raise UserError("--batch-size must be >= 1 and --examples >= 0")
    t0 = time.perf_counter()
    out_dir = args.out or default_out_dir(args.run_a, args.run_b)
    check_out_dir(out_dir)  # before the work, not after it
    result = compare(args.run_a, args.run_b, args.data_dir, args.data_b,
                     threshold=args.threshold, max_rows=args.max_rows, split=args.split,
                     batch_size=args.batch_size, n_examples=args.examples)
    if not files.is_remote(out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = write_compare_artifacts(result, out_dir)
    print(format_summary(result), file=sys.stderr)
    return {**summary(result), "out": paths, "seconds": round(time.perf_counter() - t0, 2)}
