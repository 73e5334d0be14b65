"""What `sae-jax prune` removes, and how a smaller SAE is cut out of a bigger one: pure
functions over params, fire counts and decoder rows (the command is `release/prune.py`).

**Candidates, in the order they are removed:**
1. *dead* latents: never fired on the store's training rows (`fires == 0`, the count
   `core_metrics.eval_sums` keeps, whose fraction eval reports as `dead_frac`);
2. *duplicates*: among the live latents, pairs whose decoder directions have cosine ≥ the
   threshold (each latent's `N_CANDIDATES` nearest rows, `matching.scan_cosines`); taken from
   the highest cosine down, the less frequent of each pair is dropped while both remain
   (ties: the higher id);
3. *width*: the rest, least contribution first, until the target width: a latent's
   contribution is the increase of the squared error (SSE) when it alone is removed,
   exactly ΔSSE_i = Σ_rows ‖r + f_i d_i‖² − ‖r‖² = Σ_rows f_i² ‖d_i‖² + 2 f_i ⟨r, d_i⟩
   (r = x − x̂, d_i the raw-unit decoder row), measured on a sample of training rows. For
   relu, jumprelu, batchtopk and matryoshka (at inference each latent fires on its own
   threshold) this is the exact single-removal increase; for topk it leaves out the latent
   that takes the freed slot, which can only lower the error. Cross terms between removed
   latents are not in it: the budget search below measures them.

**Budget.** The candidates form one list; `largest_within_budget` keeps the longest prefix
whose *measured* held-out FVU increase stays within the budget, so no estimate is trusted
with the guarantee. Tried prefixes are evaluated as masks (`mask_latents`: the same outputs
as the cut SAE, and one compiled program for every try); the chosen cut is then evaluated
sliced, and should rounding put it over the budget, one latent fewer is removed.

**Slicing** keeps the surviving latents in their old order, along every param axis named
"latent" (`saes.param_axes`: W_enc's columns, b_enc, W_dec's rows, JumpReLU's
log_threshold); shared params (b_dec, BatchTopK's scalar threshold, a transcoder's W_skip)
are kept as they are. Matryoshka levels become the number of survivors below each old level
(order is kept, so every prefix is still a prefix). TopK keeps at least k latents (a row
must have k to choose from); BatchTopK/Matryoshka encode by their threshold, so their k
(used only in training) is clamped to the new width.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import saes
from sae_jax.analysis.catalog import FeatureCatalog
from sae_jax.analysis.matching import scan_cosines, unit_rows
from sae_jax.batches import padded_batches
from sae_jax.saes import matryoshka

N_CANDIDATES = 8
"""Nearest decoder rows examined per latent for duplicates (larger groups are still found
through chains of pairs)."""
REASONS = ("dead", "duplicate", "width")


def dead_latents(fires: np.ndarray) -> np.ndarray:
    """Ids of latents that fired on no row (sorted)."""
    return np.flatnonzero(np.asarray(fires) == 0)


def duplicate_latents(w_dec, fires: np.ndarray, among: np.ndarray,
                      threshold: float) -> list[dict]:
    """Near-duplicate latents to drop: `[{"id", "kept", "cosine"}]`, highest cosine first.

    Args:
      w_dec: decoder rows (F, d) (their directions are compared; norms do not matter).
      fires: rows each latent fired on (F,): of a pair, the more frequent one is kept.
      among: the latent ids to consider (the live ones).
      threshold: decoder cosine at or above which two latents are duplicates.
    """
    among = np.asarray(among, np.int64)
    if len(among) < 2:
        return []
    u = unit_rows(np.asarray(w_dec)[among])
    scan = scan_cosines(u, u, min(N_CANDIDATES, len(among)), keep_dense=False)
    a = np.repeat(np.arange(len(among)), scan["cand_a"].shape[1])
    b, cos = scan["cand_a"].ravel(), scan["cos_a"].ravel()
    hit = (a != b) & (cos >= threshold)
    order = np.lexsort((a[hit], -cos[hit]))  # highest cosine first, then by id
    dropped, out = set(), []
    for i, j, c in zip(among[a[hit]][order], among[b[hit]][order], cos[hit][order]):
        if i in dropped or j in dropped:
            continue
        keep, drop = (i, j) if (fires[i], -i) >= (fires[j], -j) else (j, i)
        dropped.add(drop)
        out.append({"id": int(drop), "kept": int(keep), "cosine": float(c)})
    return out


@jax.jit
def _removal_sums(sae, rows, n_valid):
    """Per latent, Σ over the valid rows of ‖r + f_i d_i‖² − ‖r‖² (module docstring)."""
    valid = (jnp.arange(rows.shape[0]) < n_valid)[:, None]
    x_in, x = sae.split_rows(rows)
    f = sae.encode_raw(x_in)
    r = jnp.where(valid, x - sae.reconstruct_raw(x_in, f), 0.0)
    f = jnp.where(valid, f, 0.0)
    d = sae.params["W_dec"] / sae.output_scale  # raw-unit decoder rows
    r_dot_d = jnp.matmul(r, d.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(f * f, 0) * jnp.sum(d * d, 1) + 2.0 * jnp.sum(f * r_dot_d, 0)


def removal_sse(sae, rows: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """ΔSSE_i (float64, raw units, summed over `rows`): how much the squared error of `rows`
    grows when latent i alone is removed (module docstring)."""
    total = np.zeros(sae.width)
    for batch in padded_batches(len(rows), batch_size, rows):
        total += np.asarray(_removal_sums(sae, batch.arrays[0].astype(np.float32),
                                          batch.n_valid), np.float64)
    return total


def removal_order(dead: np.ndarray, duplicates: list[dict], contribution: dict[int, float],
                  width: int | None, n_latents: int, min_width: int) -> list[dict]:
    """The candidates in removal order, each `{"id", "reason", ...}`, at most
    `n_latents - min_width` of them.

    Args:
      contribution: `{id: ΔSSE}` of the latents left after dead and duplicates: the least
        ones are dropped by width until `width` latents remain (none when `width` is None).
    """
    order = [{"id": int(i), "reason": "dead"} for i in dead]
    order += [{**d, "reason": "duplicate"} for d in duplicates]
    if width is not None:
        ranked = sorted(contribution, key=lambda i: (contribution[i], i))
        extra = max(0, len(ranked) - width)
        order += [{"id": int(i), "reason": "width", "delta_sse": float(contribution[i])}
                  for i in ranked[:extra]]
    return order[:max(0, n_latents - min_width)]


def largest_within_budget(n_max: int, increase: Callable[[int], float],
                          budget: float) -> int:
    """The largest m ≤ `n_max` found with `increase(m) <= budget` (`increase(0)` is taken
    as 0): all of them if `increase(n_max)` fits, else a binary search between a prefix
    that fits and one that does not. The m returned was measured to fit."""
    if n_max == 0 or increase(n_max) <= budget:
        return n_max
    lo, hi = 0, n_max
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if increase(mid) <= budget else (lo, mid)
    return lo


def kept_latents(n_latents: int, removed) -> np.ndarray:
    """The surviving ids, in their old order."""
    keep = np.ones(n_latents, bool)
    keep[np.asarray(list(removed), np.int64)] = False
    return np.flatnonzero(keep)


MASKED_BIAS = -1e30
"""Encoder bias of a masked latent: it never passes a threshold or wins a top-k slot against
a live latent, and its ReLU/JumpReLU output is exactly 0 (-inf would make JumpReLU's h·0 NaN)."""


def mask_latents(params: dict, removed) -> dict:
    """`params` with latents `removed` silenced (encoder bias `MASKED_BIAS`, decoder row 0):
    outputs as if they were cut out, at the old shapes. A TopK SAE must keep at least k
    live latents (`min_width`), or a masked one could fill a slot (with value 0)."""
    removed = np.asarray(list(removed), np.int64)
    b_enc = np.array(params["b_enc"], np.float32)
    w_dec = np.array(params["W_dec"], np.float32)
    b_enc[removed], w_dec[removed] = MASKED_BIAS, 0.0
    return {**params, "b_enc": b_enc, "W_dec": w_dec}


def slice_latents(params: dict, keep: np.ndarray, cfg) -> dict:
    """The params of latents `keep` only, float32 numpy (module docstring: slicing)."""
    axes = saes.param_axes(cfg)
    out = {}
    for name, value in params.items():
        a = np.asarray(value, np.float32)
        for dim, axis in enumerate(axes[name]):
            if axis == "latent":
                a = np.take(a, keep, axis=dim)
        out[name] = a
    return out


def prefix_levels(levels: tuple[int, ...], keep: np.ndarray) -> tuple[int, ...]:
    """Matryoshka levels after pruning: the survivors below each old level (empty and
    repeated levels dropped; the last is the new width)."""
    counts = np.searchsorted(np.asarray(keep), np.asarray(levels))
    return tuple(sorted({int(c) for c in counts if c > 0}))


def min_width(cfg) -> int:
    """The fewest latents a pruned SAE of `cfg` may keep: k for TopK, else 1."""
    return cfg.k if cfg.arch in ("topk", "crosscoder_topk") else 1


def pruned_config(cfg, keep: np.ndarray):
    """`cfg` for the surviving latents `keep` (module docstring: slicing)."""
    width = len(keep)
    updates = {"width": width}
    if cfg.arch == "matryoshka":
        updates["matryoshka_widths"] = prefix_levels(matryoshka.levels(cfg), keep)
    if cfg.arch in ("batchtopk", "matryoshka", "crosscoder_batchtopk"):
        updates["k"] = min(cfg.k, width)
    return dataclasses.replace(cfg, **updates)


def map_catalog(catalog: FeatureCatalog, keep: np.ndarray, run: str,
                source: str) -> FeatureCatalog:
    """The catalog of the pruned run: entries of surviving latents with their new ids (the
    rest left out); the header records the new width and where it was pruned from."""
    new_id = {int(old): new for new, old in enumerate(keep)}
    features = [{**f, "id": new_id[int(f["id"])]} for f in catalog.features
                if int(f["id"]) in new_id]
    header = {**catalog.header, "run": run, "width": len(keep), "n_features": len(features),
              "pruned_from": {"run": source, "width": catalog.header.get("width"),
                              "ids": "new ids; pruned_from.json's new_to_old maps them back"}}
    return FeatureCatalog(header, features)
