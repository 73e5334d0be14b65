"""Drift between two SAEs: which features they share, and which appear, vanish or split.

`match_features(W_dec_a, W_dec_b)` compares dictionaries by their decoder directions only;
`compare(RUN_A, RUN_B, DATA)` (the `sae-jax compare` command) adds how the matched features
fire on shared data, and writes `compare.json` plus `compare.png`.

**Directions.** Feature i of an SAE writes along its decoder row; its direction is the unit
row u_i = W_dec[i] / ‖W_dec[i]‖ (a zero row stays zero). A run's input scale multiplies all
its decoder rows by one positive number (raw-unit row = W_dec[i] / input_scale), and per-
feature rescaling (f_i → c·f_i, W_dec[i] → W_dec[i] / c) leaves u_i as it is, so neither
affects anything below. Both SAEs must write into the same space (equal d_in); their widths
F_A and F_B may differ.

**Scores** (C_ij = u^A_i · u^B_j, the decoder cosine):

* *One-to-one assignment* π: the matching of min(F_A, F_B) pairs (i, π(i)) maximising
  Σ C_iπ(i) (`scipy.optimize.linear_sum_assignment`; rectangular when widths differ). The
  cosine matrix is built in row blocks; up to `DENSE_MAX_ENTRIES` cosines it is kept and the
  assignment is exact (3072 × 3072: ~1 s). Beyond that (16k × 16k) only each feature's
  `n_candidates` highest-cosine partners, on both sides, are eligible (sparse LAPJV,
  `scipy.sparse.csgraph.min_weight_full_bipartite_matching`), so memory stays
  O((F_A + F_B)·n_candidates); features whose eligible partners are all taken are paired
  among themselves in index order (`assignment: "candidates"` in the result).
* *Matched*: a pair with C_iπ(i) ≥ `threshold` (default 0.7: cos² ≈ 0.5, the partner's
  direction carries half of the feature's; two random directions in d = 384 have
  |cos| ≈ 0.05). *Matched fraction* of A = matched pairs / F_A, of B = matched pairs / F_B,
  reported at `threshold` and at each of `THRESHOLDS`.
* *Best cosine* of a feature: its largest cosine with any feature of the other SAE, taken
  or not (not one-to-one).
* Every feature of A gets exactly one category, tested in this order:
  - `matched`;
  - `split`: its direction is a non-negative mix of ≥ 2 features of B: with the
    `SPLIT_CANDIDATES` features of B of highest cosine to u_i, the non-negative least-
    squares fit c = argmin_{c ≥ 0} ‖u_i − Σ_j c_j u^B_j‖ reaches a *fit cosine*
    cos(u_i, Σ_j c_j u^B_j) ≥ `threshold` that beats the best single cosine by at least
    `SPLIT_MIN_GAIN`, and at least two of them (its *parts*) have c_j ≥ `SPLIT_MIN_COEF`;
  - `merge_part`: a part of a `merged` feature of B (defined as `split` with A and B
    swapped: one feature of B where A has several);
  - `vanished`: best cosine < `threshold`: nothing in B points its way;
  - `redundant`: the rest: its closest B feature (cos ≥ `threshold`) is matched to another
    feature of A, e.g. A holds near-duplicates.
  Features of B likewise: `matched`, `merged`, `split_part` (a part of a split of A),
  `appeared` (best cosine < `threshold`), `redundant`. An even split of a feature into two
  orthogonal halves gives one-to-one cosine 1/√2 = 0.707: at threshold 0.7 it counts as
  matched (the other half appears), above 0.71 as a split.
* *Activation correlation* (with data): the Pearson correlation over token rows of
  f^A_i(x) and f^B_π(i)(x') for each one-to-one pair, where x are rows of DATA and x' the
  same rows of DATA_B (default x' = x; a second store lets SAEs of two models, e.g. before
  and after fine-tuning, each read their own activations of the same tokens). Undefined
  (null) when either feature is constant on the rows (typically: never fires). Streaming:
  each batch's centred moments (on the device, float32) are merged on the host in float64
  (Chan et al.), never storing an (N, F) matrix. Up to `DENSE_MAX_ENTRIES` pairs the full
  F_A × F_B cross-covariance is kept too, giving each feature's *best-correlated partner*
  (any feature of the other SAE).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import files, plots, saes
from sae_jax.errors import UserError

DEFAULT_THRESHOLD = 0.7
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DENSE_MAX_ENTRIES = 1 << 26  # 8192 x 8192 cosines: 256 MiB in float32
N_CANDIDATES = 8
SPLIT_CANDIDATES = 4
SPLIT_MIN_COEF = 0.2
SPLIT_MIN_GAIN = 0.1
HIST_EDGES = np.round(np.linspace(-1.0, 1.0, 41), 6)  # cosine / correlation bins, 0.05 wide
DEFAULT_MAX_ROWS = 20_000
COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"
CATEGORIES_A = ("matched", "split", "merge_part", "vanished", "redundant")
CATEGORIES_B = ("matched", "merged", "split_part", "appeared", "redundant")


# ----------------------------------------------------------------------------------------
# Decoder directions


def unit_rows(w_dec) -> np.ndarray:
    """Decoder rows scaled to unit norm (float32); all-zero rows stay zero."""
    w = np.asarray(w_dec, np.float32)
    if w.ndim != 2:
        raise UserError(f"a decoder must be a matrix (F, d_in), got shape {w.shape}")
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)


@functools.partial(jax.jit, static_argnames=("m_a", "m_b", "keep_block"))
def _scan_block(u_block, u_b, row0, n_valid, col_v, col_i, *, m_a: int, m_b: int,
                keep_block: bool):
    """Cosines of one block of A's rows with all of B: each row's top `m_a`, and B's
    running per-column top `m_b` (values, A ids) updated with the block's valid rows.
    XLA's top-k is far faster than `np.argpartition`, especially down columns."""
    cos = jnp.matmul(u_block, u_b.T, precision=jax.lax.Precision.HIGHEST)
    row_v, row_i = jax.lax.top_k(cos, m_a)
    valid = (jnp.arange(cos.shape[0]) < n_valid)[:, None]
    v, i = jax.lax.top_k(jnp.where(valid, cos, -jnp.inf).T, m_b)  # (F_B, m_b)
    # Running entries first, so on ties the earlier block (lower A ids) is kept.
    merged_v, pick = jax.lax.top_k(jnp.concatenate([col_v, v], axis=1), m_b)
    merged_i = jnp.take_along_axis(jnp.concatenate([col_i, i + row0], axis=1), pick, axis=1)
    return (cos if keep_block else None), row_v, row_i, merged_v, merged_i


def scan_cosines(u_a: np.ndarray, u_b: np.ndarray, n_candidates: int = N_CANDIDATES,
                 keep_dense: bool = True, block_rows: int = 1024) -> dict:
    """One pass over the cosine matrix in blocks of A's rows (memory O(block_rows · F_B)).

    Returns:
      `cand_a` (F_A, m) ids of each A feature's m highest-cosine B features (best first),
      `cos_a` their cosines, `cand_b`/`cos_b` the same for B's features, and `dense` (the
      whole (F_A, F_B) float32 matrix, or None unless `keep_dense`).
    """
    f_a, f_b = len(u_a), len(u_b)
    m_a, m_b = min(n_candidates, f_b), min(n_candidates, f_a)
    block_rows = min(max(block_rows, m_b), f_a)
    cand_a = np.zeros((f_a, m_a), np.int64)
    cos_a = np.zeros((f_a, m_a), np.float32)
    col_v = jnp.full((f_b, m_b), -jnp.inf, jnp.float32)
    col_i = jnp.zeros((f_b, m_b), jnp.int32)
    dense = np.empty((f_a, f_b), np.float32) if keep_dense else None
    u_b_dev = jnp.asarray(u_b)
    for lo in range(0, f_a, block_rows):
        block = np.zeros((block_rows, u_a.shape[1]), np.float32)  # one shape: one compile
        b = min(block_rows, f_a - lo)
        block[:b] = u_a[lo:lo + b]
        cos, row_v, row_i, col_v, col_i = _scan_block(
            block, u_b_dev, lo, b, col_v, col_i, m_a=m_a, m_b=m_b, keep_block=keep_dense)
        if dense is not None:
            dense[lo:lo + b] = np.asarray(cos)[:b]
        cos_a[lo:lo + b], cand_a[lo:lo + b] = np.asarray(row_v)[:b], np.asarray(row_i)[:b]
    return {"cand_a": cand_a, "cos_a": cos_a, "cand_b": np.asarray(col_i, np.int64),
            "cos_b": np.asarray(col_v), "dense": dense}


def _assign_dense(cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(cos.astype(np.float64), maximize=True)


def _assign_candidates(scan: dict, f_a: int, f_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Max-cosine matching restricted to candidate pairs (both sides' top lists).

    Every A feature also gets a private "no partner" column, so a full matching always
    exists. Weights are cos + 2 for real pairs and 2 for "no partner", so the solver
    maximises the sum of cosines over the pairs it makes, with "no partner" worth a pair of
    cosine 0. (Pushing for as many real pairs as possible instead would break a good pair
    to make two poor ones.) The features left over are then paired in index order: their
    cosines are below all their candidates', as the leftovers of the exact assignment are.
    """
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    rows = np.concatenate([np.repeat(np.arange(f_a), scan["cand_a"].shape[1]),
                           scan["cand_b"].ravel()])
    cols = np.concatenate([scan["cand_a"].ravel(),
                           np.repeat(np.arange(f_b), scan["cand_b"].shape[1])])
    weights = np.concatenate([scan["cos_a"].ravel(), scan["cos_b"].ravel()]) + 2.0
    key = np.unique(rows * f_b + cols, return_index=True)[1]  # pairs listed on both sides once
    rows, cols, weights = rows[key], cols[key], weights[key].astype(np.float64)
    rows = np.concatenate([rows, np.arange(f_a)])
    cols = np.concatenate([cols, f_b + np.arange(f_a)])
    weights = np.concatenate([weights, np.full(f_a, 2.0)])
    graph = coo_array((weights, (rows, cols)), shape=(f_a, f_b + f_a)).tocsr()
    r, c = min_weight_full_bipartite_matching(graph, maximize=True)
    real = c < f_b
    r, c = r[real], c[real]
    free_a = np.setdiff1d(np.arange(f_a), r)
    free_b = np.setdiff1d(np.arange(f_b), c)
    n = min(len(free_a), len(free_b))
    r, c = np.concatenate([r, free_a[:n]]), np.concatenate([c, free_b[:n]])
    order = np.argsort(r)
    return r[order], c[order]


def _pair_cosines(u_a, u_b, rows, cols) -> np.ndarray:
    return np.einsum("nd,nd->n", u_a[rows], u_b[cols]) if len(rows) else np.zeros(0, np.float32)


def _explained_by_several(u_src: np.ndarray, u_tgt: np.ndarray, cand: np.ndarray,
                          ids: np.ndarray, threshold: float) -> dict[int, dict]:
    """Source features (of `ids`) that are a non-negative mix of ≥ 2 target features.

    Returns `{id: {"fit_cosine", "parts": [(target id, coefficient, cosine), ...]}}`
    (see the module docstring's `split`)."""
    from scipy.optimize import nnls

    found = {}
    for i in ids:
        targets = cand[i, :SPLIT_CANDIDATES]
        basis = u_tgt[targets].astype(np.float64)  # (K, d)
        u = u_src[i].astype(np.float64)
        coef, _ = nnls(basis.T, u)
        fit = coef @ basis
        norm = np.linalg.norm(fit)
        fit_cos = float(fit @ u / norm) if norm > 0 else 0.0
        parts = np.flatnonzero(coef >= SPLIT_MIN_COEF)
        best_single = float(basis[0] @ u)
        if len(parts) >= 2 and fit_cos >= max(threshold, best_single + SPLIT_MIN_GAIN):
            found[int(i)] = {"fit_cosine": fit_cos, "parts": [
                (int(targets[p]), float(coef[p]), float(basis[p] @ u)) for p in parts]}
    return found


def _categorise(f: int, matched: np.ndarray, several: dict, parts_of_other: set,
                best: np.ndarray, threshold: float, names: tuple) -> np.ndarray:
    """One category per feature, in the order of `names` (module docstring)."""
    cat = np.full(f, names[4], dtype=object)
    cat[best < threshold] = names[3]
    cat[list(parts_of_other)] = names[2]
    cat[list(several)] = names[1]
    cat[matched] = names[0]
    return cat


def _histogram(values: np.ndarray) -> list[int]:
    v = np.clip(values[np.isfinite(values)], -1.0, 1.0)
    return np.histogram(v, bins=HIST_EDGES)[0].tolist()


def _frac(count: int, total: int) -> float:
    return count / total if total else float("nan")


def match_features(w_dec_a, w_dec_b, threshold: float = DEFAULT_THRESHOLD, *,
                   n_candidates: int = N_CANDIDATES,
                   dense_max_entries: int = DENSE_MAX_ENTRIES,
                   block_rows: int = 1024) -> dict:
    """Matches the features of two SAEs by decoder direction (module docstring).

    Args:
      w_dec_a, w_dec_b: decoders (F_A, d) and (F_B, d), any positive row scales.
      threshold: the cosine a one-to-one pair needs to count as matched.
      n_candidates: partners kept per feature (the assignment's pool beyond
        `dense_max_entries`; at least `SPLIT_CANDIDATES`).
      dense_max_entries: largest F_A·F_B solved exactly on the whole matrix.
      block_rows: A rows per block of the cosine matrix.

    Returns:
      A dict of summary numbers (`n_matched`, `matched_frac_a/_b`, `matched_frac_at`,
      `matched_cosine_mean/_median` over all one-to-one pairs, `best_cosine_mean_a/_b`,
      `counts` per category, `cosine_hist`), `splits` / `merges` (`{id: {fit_cosine,
      parts}}`) and `per_feature` = {"a": ..., "b": ...} of numpy arrays: `partner` (-1:
      none), `cosine` (with the partner; NaN if none), `best`, `best_partner`, `category`.
    """
    u_a, u_b = unit_rows(w_dec_a), unit_rows(w_dec_b)
    if u_a.shape[1] != u_b.shape[1]:
        raise UserError(f"the SAEs write into different spaces: d_in {u_a.shape[1]} vs "
                        f"{u_b.shape[1]}; compare SAEs of the same model width")
    if not 0 < threshold <= 1:
        raise UserError(f"threshold must be in (0, 1], got {threshold}")
    f_a, f_b = len(u_a), len(u_b)
    if f_a == 0 or f_b == 0:
        raise UserError("an SAE with no features cannot be compared")
    exact = f_a * f_b <= dense_max_entries
    scan = scan_cosines(u_a, u_b, max(n_candidates, SPLIT_CANDIDATES), keep_dense=exact,
                        block_rows=block_rows)
    rows, cols = (_assign_dense(scan["dense"]) if exact else
                  _assign_candidates(scan, f_a, f_b))
    scan["dense"] = None
    pair_cos = _pair_cosines(u_a, u_b, rows, cols)
    sides = {}
    for side, f, mine, theirs in (("a", f_a, rows, cols), ("b", f_b, cols, rows)):
        partner = np.full(f, -1, np.int64)
        partner[mine] = theirs
        cosine = np.full(f, np.nan, np.float32)
        cosine[mine] = pair_cos
        sides[side] = {"partner": partner, "cosine": cosine,
                       "best": scan[f"cos_{side}"][:, 0].copy(),
                       "best_partner": scan[f"cand_{side}"][:, 0].copy()}
    is_matched = pair_cos >= threshold
    matched_a, matched_b = rows[is_matched], cols[is_matched]
    unmatched_a = np.setdiff1d(np.arange(f_a), matched_a)
    unmatched_b = np.setdiff1d(np.arange(f_b), matched_b)
    splits = _explained_by_several(u_a, u_b, scan["cand_a"], unmatched_a, threshold)
    merges = _explained_by_several(u_b, u_a, scan["cand_b"], unmatched_b, threshold)
    split_parts = {p[0] for s in splits.values() for p in s["parts"]} - set(matched_b.tolist())
    merge_parts = {p[0] for s in merges.values() for p in s["parts"]} - set(matched_a.tolist())
    sides["a"]["category"] = _categorise(f_a, matched_a, splits, merge_parts,
                                         sides["a"]["best"], threshold, CATEGORIES_A)
    sides["b"]["category"] = _categorise(f_b, matched_b, merges, split_parts,
                                         sides["b"]["best"], threshold, CATEGORIES_B)
    at = sorted({*THRESHOLDS, threshold})
    n_matched = int(is_matched.sum())
    return {
        "width_a": f_a, "width_b": f_b, "d_in": int(u_a.shape[1]), "threshold": threshold,
        "assignment": "exact" if exact else "candidates",
        "n_pairs": int(len(rows)), "n_matched": n_matched,
        "matched_frac_a": _frac(n_matched, f_a), "matched_frac_b": _frac(n_matched, f_b),
        "matched_frac_at": {f"{t:g}": {"a": _frac(int((pair_cos >= t).sum()), f_a),
                                       "b": _frac(int((pair_cos >= t).sum()), f_b)}
                            for t in at},
        "matched_cosine_mean": float(pair_cos.mean()) if len(pair_cos) else float("nan"),
        "matched_cosine_median": float(np.median(pair_cos)) if len(pair_cos) else float("nan"),
        "best_cosine_mean_a": float(sides["a"]["best"].mean()),
        "best_cosine_mean_b": float(sides["b"]["best"].mean()),
        "counts": {**{f"{c}_a": int((sides["a"]["category"] == c).sum())
                      for c in CATEGORIES_A},
                   **{f"{c}_b": int((sides["b"]["category"] == c).sum())
                      for c in CATEGORIES_B}},
        "cosine_hist": {"bin_edges": HIST_EDGES.tolist(), "one_to_one": _histogram(pair_cos),
                        "best_a": _histogram(sides["a"]["best"]),
                        "best_b": _histogram(sides["b"]["best"])},
        "splits": splits, "merges": merges, "per_feature": sides,
    }


# ----------------------------------------------------------------------------------------
# Activation correlation on shared rows


@functools.partial(jax.jit, static_argnames=("cfg_a", "cfg_b", "scale_a", "scale_b", "cross"))
def _moments(params_a, params_b, x_a, x_b, partner, n_valid, *, cfg_a, cfg_b, scale_a: float,
             scale_b: float, cross: bool) -> dict:
    """One batch's centred moments of both SAEs' activations (float32, on the device); rows
    from `n_valid` on are padding."""
    valid = (jnp.arange(x_a.shape[0]) < n_valid)[:, None]
    f_a = jnp.where(valid, saes.encode(params_a, x_a * scale_a, cfg_a).f, 0.0)
    f_b = jnp.where(valid, saes.encode(params_b, x_b * scale_b, cfg_b).f, 0.0)
    f_a, f_b = f_a.astype(jnp.float32), f_b.astype(jnp.float32)
    mean_a, mean_b = f_a.sum(0) / n_valid, f_b.sum(0) / n_valid
    c_a = jnp.where(valid, f_a - mean_a, 0.0)
    c_b = jnp.where(valid, f_b - mean_b, 0.0)
    out = {"mean_a": mean_a, "mean_b": mean_b,
           "m2_a": jnp.square(c_a).sum(0), "m2_b": jnp.square(c_b).sum(0),
           "c_pair": (c_a * c_b[:, partner]).sum(0),
           "fires_a": (f_a > 0).sum(0), "fires_b": (f_b > 0).sum(0)}
    if cross:
        out["c_cross"] = jnp.matmul(c_a.T, c_b, precision=jax.lax.Precision.HIGHEST)
    return out


def _merge_moments(acc: dict | None, n_b: int, batch: dict, partner: np.ndarray) -> dict:
    """Chan et al.'s merge of (count, means, centred second moments), in float64; `partner`
    pairs each A feature with the B feature of its `c_pair` entry."""
    batch = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    if acc is None:
        return {"n": n_b, **batch}
    n_a, n = acc["n"], acc["n"] + n_b
    w = n_a * n_b / n
    d_a, d_b = batch["mean_a"] - acc["mean_a"], batch["mean_b"] - acc["mean_b"]
    out = {"n": n, "mean_a": acc["mean_a"] + d_a * (n_b / n),
           "mean_b": acc["mean_b"] + d_b * (n_b / n),
           "m2_a": acc["m2_a"] + batch["m2_a"] + np.square(d_a) * w,
           "m2_b": acc["m2_b"] + batch["m2_b"] + np.square(d_b) * w,
           "c_pair": acc["c_pair"] + batch["c_pair"] + d_a * d_b[partner] * w,
           "fires_a": acc["fires_a"] + batch["fires_a"],
           "fires_b": acc["fires_b"] + batch["fires_b"]}
    if "c_cross" in acc:
        out["c_cross"] = acc["c_cross"] + batch["c_cross"] + np.outer(d_a * w, d_b)
    return out


def _best_correlated(c_cross: np.ndarray, sd_a: np.ndarray, sd_b: np.ndarray, axis: int):
    """(best correlation, partner id) per row (axis=1) or column (axis=0); NaN/-1 if none."""
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = c_cross / np.outer(sd_a, sd_b)
    corr = np.where(np.isfinite(corr), corr, -np.inf)
    idx = np.argmax(corr, axis=axis)
    best = np.take_along_axis(corr, np.expand_dims(idx, axis), axis).squeeze(axis)
    missing = ~np.isfinite(best)
    return np.where(missing, np.nan, best), np.where(missing, -1, idx)


def _encoder_width(sae) -> int:
    return int(sae.params["W_enc"].shape[0])


def activation_correlation(sae_a, sae_b, rows, partner_a: np.ndarray, rows_b=None, *,
                           max_rows: int = DEFAULT_MAX_ROWS, batch_size: int = 2048,
                           cross: bool = True) -> dict:
    """Pearson correlation of each one-to-one pair's activations over shared rows.

    Args:
      sae_a, sae_b: `sae_jax.sae.SAE`s.
      rows: raw activation rows for A (a `store.RowSpan` or `loader.ArraySpan`).
      partner_a: (F_A,) B partner of each A feature, -1 for none.
      rows_b: rows for B, the same tokens as `rows` (default: `rows`).
      max_rows: read at most this many rows from the start of `rows`.
      batch_size: rows per encode (one compiled shape; the last batch is padded).
      cross: also keep the (F_A, F_B) cross-covariance for best-correlated partners.

    Returns:
      `n_rows`, per feature (numpy) `corr_a` (with the partner; NaN if undefined),
      `frequency_a/_b` (fraction of rows fired on), and with `cross` `best_corr_a/_b`,
      `best_corr_partner_a/_b`.
    """
    rows_b = rows if rows_b is None else rows_b
    for sae, span, name in ((sae_a, rows, "A"), (sae_b, rows_b, "B")):
        # A transcoder's rows hold its input then its target; it encodes the input only.
        width = getattr(sae, "row_width", _encoder_width(sae))
        if span.d_in != width:
            raise UserError(f"data for SAE {name} has d_in={span.d_in}, but the SAE expects "
                            f"d_in={width}")
    n = min(len(rows), max_rows)
    if len(rows_b) < n:
        raise UserError(f"the data for B has {len(rows_b)} rows, fewer than the {n} compared")
    if n < 2:
        raise UserError(f"activation correlation needs at least 2 rows, got {n}")
    partner_safe = np.maximum(partner_a, 0)
    static = {"cfg_a": sae_a.config, "cfg_b": sae_b.config, "scale_a": sae_a.input_scale,
              "scale_b": sae_b.input_scale, "cross": cross}
    partner_dev = jnp.asarray(partner_safe, jnp.int32)
    acc = None
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        x_a = np.zeros((batch_size, _encoder_width(sae_a)), np.float32)
        x_b = np.zeros((batch_size, _encoder_width(sae_b)), np.float32)
        x_a[:stop - start] = rows.read(start, stop)[:, :x_a.shape[1]]
        x_b[:stop - start] = rows_b.read(start, stop)[:, :x_b.shape[1]]
        out = jax.device_get(_moments(sae_a.params, sae_b.params, x_a, x_b, partner_dev,
                                      stop - start, **static))
        acc = _merge_moments(acc, stop - start, out, partner_safe)
    sd_a, sd_b = np.sqrt(acc["m2_a"]), np.sqrt(acc["m2_b"])
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = acc["c_pair"] / (sd_a * sd_b[partner_safe])
    corr = np.where((partner_a >= 0) & np.isfinite(corr), corr, np.nan)
    result = {"n_rows": n, "corr_a": corr, "frequency_a": acc["fires_a"] / n,
              "frequency_b": acc["fires_b"] / n}
    if cross:
        result["best_corr_a"], result["best_corr_partner_a"] = _best_correlated(
            acc["c_cross"], sd_a, sd_b, axis=1)
        result["best_corr_b"], result["best_corr_partner_b"] = _best_correlated(
            acc["c_cross"], sd_a, sd_b, axis=0)
    return result


# ----------------------------------------------------------------------------------------
# Putting it together


def catalog_index(run_dir, n_tokens: int = 5) -> dict[int, dict]:
    """`{id: {"label", "top_tokens"}}` from the run's `feature_catalog.json` (written by
    `sae-jax dashboard`), or {} if the run has none."""
    from sae_jax.analysis.interpret import read_catalog

    try:
        catalog = read_catalog(run_dir)
    except UserError:
        return {}
    return {int(f["id"]): {"label": f.get("label"),
                           "top_tokens": [t[0] for t in (f.get("top_tokens") or [])[:n_tokens]]}
            for f in catalog.features}


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
           "corr_hist": {"bin_edges": HIST_EDGES.tolist(), "one_to_one": _histogram(corr),
                         "matched": _histogram(corr[matched])}}
    if "best_corr_a" in act:
        out["best_corr_mean_a"] = _mean(act["best_corr_a"])
        out["best_corr_mean_b"] = _mean(act["best_corr_b"])
        out["corr_hist"]["best_a"] = _histogram(act["best_corr_a"])
        out["corr_hist"]["best_b"] = _histogram(act["best_corr_b"])
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
    match = match_features(sae_a.params["W_dec"], sae_b.params["W_dec"], threshold,
                           **match_kwargs)
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
        ids_a = a.token_ids[rows.start:rows.start + n].read().result()
        ids_b = b.token_ids[rows_b.start:rows_b.start + n].read().result()
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
    from sae_jax.data.store import open_store
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
    text = json.dumps(files.json_safe(result), allow_nan=False) + "\n"
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
    result = compare(args.run_a, args.run_b, args.data_dir, args.data_b,
                     threshold=args.threshold, max_rows=args.max_rows, split=args.split,
                     batch_size=args.batch_size, n_examples=args.examples)
    out_dir = args.out or default_out_dir(args.run_a, args.run_b)
    if not files.is_remote(out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = write_compare_artifacts(result, out_dir)
    print(format_summary(result), file=sys.stderr)
    return {**summary(result), "out": paths, "seconds": round(time.perf_counter() - t0, 2)}
