"""Matching the features of two SAEs by their decoder directions alone.

`match_features(W_dec_a, W_dec_b)` pairs the features of SAE A with those of SAE B and sorts
every feature into a category (matched, split, merged, vanished, appeared, ...); `compare`
builds the `sae-jax compare` report on it.

**Directions.** Feature i of an SAE writes along its decoder row; its direction is the unit
row u_i = W_dec[i] / ‖W_dec[i]‖ (a zero row stays zero). A run's input scale multiplies all
its decoder rows by one positive number (raw-unit row = W_dec[i] / input_scale; a run on a
multi-source store, whose scale is per source, is compared in raw units), and per-
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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.batches import padded_batches
from sae_jax.errors import UserError
from sae_jax.vectors import unit_vectors

DEFAULT_THRESHOLD = 0.7
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DENSE_MAX_ENTRIES = 1 << 26  # 8192 x 8192 cosines: 256 MiB in float32
N_CANDIDATES = 8
SPLIT_CANDIDATES = 4
SPLIT_MIN_COEF = 0.2
SPLIT_MIN_GAIN = 0.1
HIST_EDGES = np.round(np.linspace(-1.0, 1.0, 41), 6)  # cosine / correlation bins, 0.05 wide
CATEGORIES_A = ("matched", "split", "merge_part", "vanished", "redundant")
CATEGORIES_B = ("matched", "merged", "split_part", "appeared", "redundant")


def unit_rows(w_dec) -> np.ndarray:
    """Decoder rows scaled to unit norm (float32); all-zero rows stay zero."""
    w = np.asarray(w_dec)
    if w.ndim != 2:
        raise UserError(f"a decoder must be a matrix (F, d_in), got shape {w.shape}")
    return unit_vectors(w).astype(np.float32)


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
    for batch in padded_batches(f_a, block_rows, u_a):
        (block,), lo, b = batch.arrays, batch.start, batch.n_valid
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


def cosine_histogram(values: np.ndarray) -> list[int]:
    """Counts of cosines (or correlations) in the bins of `HIST_EDGES`; NaN left out."""
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
        "cosine_hist": {"bin_edges": HIST_EDGES.tolist(),
                        "one_to_one": cosine_histogram(pair_cos),
                        "best_a": cosine_histogram(sides["a"]["best"]),
                        "best_b": cosine_histogram(sides["b"]["best"])},
        "splits": splits, "merges": merges, "per_feature": sides,
    }
