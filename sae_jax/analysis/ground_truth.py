"""Scoring an SAE against the true features of synthetic data (`data.structured`).

With the truth known, a dictionary can be scored directly instead of by proxies:

* **MCC** (mean cosine under a one-to-one assignment, SynthSAEBench's dictionary score):
  u_j = W_dec[j] / ‖W_dec[j]‖ the SAE's unit decoder rows, a_i the N true unit atoms, π the
  one-to-one assignment of true features to distinct latents maximising Σ_i a_i·u_π(i)
  (`analysis.matching`, exact Hungarian), and MCC = (1/N) Σ_i a_i·u_π(i). The cosine is
  *signed*: a latent's activation is non-negative, so a decoder row pointing at −a_i does
  not represent feature i. A true feature left without a latent (width < N) counts 0.
  1 for the true dictionary; a random one in d = 64 scores ~0.3 (the best of many random
  cosines is far from 0, which is why the baseline matters).
* **F1** of the recovered features: on held-out rows with known codes, true feature i fires
  where codes[:, i] > 0, its assigned latent π(i) where f[:, π(i)] > 0. Precision = rows
  where both fire / rows where the latent fires, recall = the same / rows where the feature
  fires, F1 = 2PR/(P+R) (0 when either is 0), averaged over the true features that fire in
  the held-out rows (unweighted: a rare feature counts as much as a frequent one). It sees
  what MCC cannot: a latent pointing at a child but firing whenever the parent does
  (absorption's mirror), or a latent that is right but rarely fires.
* `atoms_recovered`: fraction of true atoms whose best decoder row (not one-to-one) has
  cosine ≥ 0.9 (`data.synthetic.atoms_recovered`).
"""

from __future__ import annotations

import jax
import numpy as np

from sae_jax.analysis.evaluate import evaluate
from sae_jax.analysis.matching import match_features
from sae_jax.batches import padded_batches
from sae_jax.data.loader import ArraySpan
from sae_jax.data.synthetic import atoms_recovered
from sae_jax.errors import UserError
from sae_jax.sae import SAE


def mcc(w_dec, atoms) -> dict:
    """The one-to-one mean cosine of true `atoms (N, d)` with decoder rows `w_dec (F, d)`.

    Returns:
      `mcc` (float), `partner` (N,) int64 (the latent assigned to each true feature, -1 if
      none) and `cosine` (N,) float32 (0 where none).
    """
    atoms, w_dec = np.asarray(atoms), np.asarray(w_dec)
    if atoms.ndim != 2 or w_dec.ndim != 2 or atoms.shape[1] != w_dec.shape[1]:
        raise UserError(f"true atoms {atoms.shape} and decoder {w_dec.shape} must be matrices "
                        "over the same d")
    side = match_features(atoms, w_dec)["per_feature"]["a"]
    cosine = np.nan_to_num(side["cosine"], nan=0.0)
    return {"mcc": float(cosine.mean()), "partner": side["partner"], "cosine": cosine}


def firing_f1(true_on: np.ndarray, latent_on: np.ndarray) -> dict:
    """Per-column precision, recall and F1 of boolean `latent_on` against `true_on`, both
    (n_rows, N); columns where the feature never truly fires give NaN."""
    tp = (true_on & latent_on).sum(axis=0).astype(np.float64)
    n_true, n_pred = true_on.sum(axis=0), latent_on.sum(axis=0)
    precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    recall = np.divide(tp, n_true, out=np.full_like(tp, np.nan), where=n_true > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    f1[n_true == 0] = np.nan
    precision[n_true == 0] = np.nan
    return {"precision": precision, "recall": recall, "f1": f1}


def latent_firing(sae: SAE, rows: np.ndarray, latents: np.ndarray,
                  batch_size: int = 8192) -> np.ndarray:
    """(n_rows, len(latents)) bool: where each of `latents` is active (> 0) on raw `rows`."""
    out = np.zeros((len(rows), len(latents)), bool)
    for batch in padded_batches(len(rows), batch_size, rows):
        f = jax.device_get(sae.encode(batch.arrays[0], columns=latents))
        out[batch.start:batch.start + batch.n_valid] = f[:batch.n_valid] > 0
    return out


def score_sae(sae: SAE, atoms: np.ndarray, rows: np.ndarray, codes: np.ndarray,
              kinds: dict[str, np.ndarray] | None = None, batch_size: int = 8192) -> dict:
    """MCC, F1 (module docstring) and eval's FVU / L0 / dead fraction of `sae` on held-out
    `rows (n, d)` whose true codes are `codes (n, N)`.

    Args:
      kinds: optional `{name: (N,) bool mask}` of feature subsets (e.g.
        `structured.feature_kinds`) to score separately as well.

    Returns:
      Flat floats `mcc`, `f1`, `precision`, `recall`, `atoms_recovered`, `fvu`, `l0`,
      `dead_frac`, `n_scored` (true features that fire in `rows`), and `mcc_<kind>`,
      `f1_<kind>` for each of `kinds`.
    """
    if len(rows) != len(codes) or codes.shape[1] != len(atoms):
        raise UserError(f"held-out rows {rows.shape}, codes {codes.shape} and atoms "
                        f"{np.shape(atoms)} do not agree")
    w_dec = np.asarray(sae.params["W_dec"])
    match = mcc(w_dec, atoms)
    partner = match["partner"]
    has = partner >= 0
    on = np.zeros(codes.shape, bool)
    on[:, has] = latent_firing(sae, rows, partner[has], batch_size)
    scores = firing_f1(codes > 0, on)
    scored = np.isfinite(scores["f1"])
    ev = evaluate(sae, ArraySpan(rows), batch_size)
    by_kind = {}
    for name, mask in (kinds or {}).items():
        by_kind[f"mcc_{name}"] = float(match["cosine"][mask].mean())
        by_kind[f"f1_{name}"] = float(scores["f1"][mask & scored].mean())
    return {**by_kind, "mcc": match["mcc"], "f1": float(scores["f1"][scored].mean()),
            "precision": float(scores["precision"][scored].mean()),
            "recall": float(scores["recall"][scored].mean()),
            "atoms_recovered": atoms_recovered(w_dec, np.asarray(atoms)),
            "fvu": ev["fvu"], "l0": ev["l0"], "dead_frac": ev["dead_frac"],
            "n_scored": int(scored.sum())}
