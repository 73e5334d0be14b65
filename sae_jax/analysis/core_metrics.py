"""The core numbers of an SAE on held-out rows, from one streamed pass (`eval_sums`) and its
weights: what `sae-jax eval` reports and what the `sae-jax evals` core suite scores.

* **Reconstruction**: `mse` (per element, raw units), `fvu` (squared error / the data's
  centred variance), `explained_variance` = 1 − FVU.
* **Sparsity**: `l0` (mean active latents per row) and its percentiles `l0_p1` … `l0_p99`
  (`L0_PERCENTILES`).
* **Feature health**: `dead_frac` (never fired on the rows) and `dense_frac` (fired on more
  than `DENSE_FREQUENCY` of them).
* **Shrinkage** = ‖x̂‖ / ‖x‖ per row in raw units (for a transcoder, of the target), mean
  over the rows with ‖x‖ > 0 (SAEBench's `l2_ratio`). Below 1: the sparsity penalty shrinks
  the reconstruction; `shrinkage_by_l0` gives the mean per L0 bucket — 0, 1, 2–3, 4–7, …
  (powers of two, so the few buckets span any width) — as shrinkage often depends on how
  many latents a row uses.
* **Decoder similarity**: each latent's largest decoder cosine to any *other* latent;
  `decoder_sim_mean` and `decoder_sim_dup_frac`, the fraction of latents with a
  near-duplicate (cosine ≥ `DUPLICATE_COSINE`, the threshold `sae-jax prune` removes
  duplicates at). Both latents of a pair count; prune drops one of each (among the live).
* **Encoder/decoder alignment**: cosine of each latent's encoder column with its decoder
  row (`enc_dec_cos_mean`, `enc_dec_cos_median`): 1 for a tied SAE; None for a transcoder,
  whose encoder and decoder live in different spaces.

Numerics: each batch's sums are taken on the device in float32, but the data variance
(FVU's denominator) is accumulated *centred* and merged on the host in float64
(`moments.merge_moments`). Rows holding NaN or infinity are refused with one line.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import files, saes
from sae_jax.analysis.downstream import FIDELITY_SEQUENCES, LM_BATCH, downstream, recovered
from sae_jax.analysis.matching import scan_cosines, unit_rows
from sae_jax.analysis.moments import merge_moments
from sae_jax.batches import padded_batches
from sae_jax.errors import UserError
from sae_jax.mesh import make_mesh
from sae_jax.rundir import IMPORTED_FROM, PRUNED_FROM
from sae_jax.sae import SAE
from sae_jax.vectors import unit_vectors

DENSE_FREQUENCY = 0.1
L0_PERCENTILES = (1, 10, 25, 50, 75, 90, 99)
DUPLICATE_COSINE = 0.9
"""Decoder cosine at or above which two latents are near-duplicates: `decoder_sim_dup_frac`
and `sae-jax prune --duplicate-cosine`'s default."""
HIGHER_IS_BETTER = {"fvu": False, "explained_variance": True, "mse": False,
                    "fidelity_recovered": True, "loss_recovered": True}
"""The core metrics on which a random baseline is meaningful, and which way is better (the
rest describe an SAE rather than rank it: L0, shrinkage, similarity, alignment)."""


@jax.jit
def _batch_sums(sae: SAE, rows, n_valid):
    """One batch's statistics in float32 (merged on the host in float64); rows from
    `n_valid` on are fill and count nowhere."""
    valid = jnp.arange(rows.shape[0]) < n_valid
    finite = jnp.isfinite(rows).all(-1)
    rows = jnp.where((valid & finite)[:, None], rows, 0.0)
    x_in, x = sae.split_rows(rows)  # x: what is reconstructed (a transcoder's target)
    f = sae.encode_raw(x_in)
    x_hat = sae.reconstruct_raw(x_in, f)
    active = (f > 0) & valid[:, None]
    mean = jnp.sum(x, axis=0) / n_valid
    norm = jnp.linalg.norm(x, axis=-1)
    return {
        "sq_err": jnp.sum(jnp.where(valid[:, None], jnp.square(x - x_hat), 0.0), axis=0),
        "mean": mean,
        "m2": jnp.sum(jnp.where(valid[:, None], jnp.square(x - mean), 0.0), axis=0),
        "l0": active.sum(-1),
        "fires": active.sum(0),
        "norm_ratio": jnp.where(norm > 0, jnp.linalg.norm(x_hat, axis=-1) / norm, jnp.nan),
        "finite": finite | ~valid,
    }


def eval_sums(sae: SAE, rows, batch_size: int = 4096) -> dict:
    """The sums every core metric is made of, streamed over `rows` `batch_size` at a time:
    float64 `sq_err` and centred `m2` (d_out,) of what is reconstructed, int64 `fires` (F,)
    (rows each feature fired on: `fires == 0` is what eval calls dead), per row int64 `l0`
    and float32 `norm_ratio` (‖x̂‖/‖x‖, NaN where ‖x‖ = 0) (n,), and `n`.
    `sae-jax prune` reads the per-feature `fires` that eval only reports in summary."""
    if rows.d_in != sae.row_width:
        raise UserError(f"eval data has d_in={rows.d_in}, but the SAE expects "
                        f"d_in={sae.row_width}")
    n = len(rows)
    if n == 0:
        raise UserError("no rows to evaluate")
    d = sae.d_out
    sq_err = np.zeros(d)
    count, mean, m2 = 0, np.zeros(d), np.zeros(d)
    fires, l0s, ratios = np.zeros(sae.width, np.int64), [], []
    for batch in padded_batches(n, batch_size, rows):
        m = batch.n_valid
        out = jax.device_get(_batch_sums(sae, batch.arrays[0].astype(np.float32), m))
        if not out["finite"].all():
            bad = batch.start + int(np.argmin(out["finite"]))
            raise UserError(f"eval row {bad} (row {getattr(rows, 'start', 0) + bad} of the "
                            "store) holds NaN or infinite values: the data is damaged; "
                            "re-import or re-harvest it")
        sq_err += out["sq_err"].astype(np.float64)
        count, mean, m2 = merge_moments(count, mean, m2, m, out["mean"].astype(np.float64),
                                        out["m2"].astype(np.float64))
        fires += out["fires"].astype(np.int64)
        l0s.append(out["l0"][:m])
        ratios.append(out["norm_ratio"][:m])
    return {"n": int(n), "sq_err": sq_err, "m2": m2, "fires": fires,
            "l0": np.concatenate(l0s).astype(np.int64), "norm_ratio": np.concatenate(ratios)}


def row_metrics(sums: dict, d_out: int) -> dict:
    """The flat numbers of an `eval_sums` result: `n_rows`, `mse`, `fvu`,
    `explained_variance`, `l0`, `l0_p<q>` for q in `L0_PERCENTILES`, `dead_frac`,
    `dense_frac` and `shrinkage` (module docstring)."""
    n, fires, l0 = sums["n"], sums["fires"], sums["l0"]
    sq_err_total = float(sums["sq_err"].sum())
    total_var = float(sums["m2"].sum())
    fvu = sq_err_total / total_var if total_var > 0 else float("nan")
    ratio = sums["norm_ratio"][np.isfinite(sums["norm_ratio"])]
    return {
        "n_rows": int(n),
        "mse": sq_err_total / (n * d_out),
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": float(l0.mean()),
        **{f"l0_p{q}": float(np.percentile(l0, q)) for q in L0_PERCENTILES},
        "dead_frac": float(np.mean(fires == 0)),
        "dense_frac": float(np.mean(fires / n > DENSE_FREQUENCY)),
        "shrinkage": float(ratio.astype(np.float64).mean()) if ratio.size else None,
    }


def l0_buckets(l0: np.ndarray) -> np.ndarray:
    """Bucket of each row's L0: 0 for L0 = 0, b ≥ 1 for 2^(b−1) ≤ L0 < 2^b."""
    l0 = np.asarray(l0, np.int64)
    return np.where(l0 > 0, np.floor(np.log2(np.maximum(l0, 1))).astype(np.int64) + 1, 0)


def shrinkage_by_l0(norm_ratio: np.ndarray, l0: np.ndarray) -> dict:
    """Mean ‖x̂‖/‖x‖ per power-of-two L0 bucket that holds rows (rows with ‖x‖ = 0 left
    out): `{"l0_min": [...], "l0_max": [...], "rows": [...], "shrinkage": [...]}`."""
    ok = np.isfinite(norm_ratio)
    bucket, ratio = l0_buckets(l0)[ok], np.asarray(norm_ratio, np.float64)[ok]
    out = {"l0_min": [], "l0_max": [], "rows": [], "shrinkage": []}
    for b in np.unique(bucket):
        sel = bucket == b
        out["l0_min"].append(0 if b == 0 else int(2 ** (b - 1)))
        out["l0_max"].append(0 if b == 0 else int(2 ** b - 1))
        out["rows"].append(int(sel.sum()))
        out["shrinkage"].append(float(ratio[sel].mean()))
    return out


def max_other_cosine(w_dec) -> np.ndarray:
    """Each decoder row's largest cosine to any *other* row (F,) (0 for an all-zero row;
    −1 … 1 otherwise; a single latent has no other: NaN)."""
    u = unit_rows(w_dec)
    if len(u) < 2:
        return np.full(len(u), np.nan, np.float32)
    scan = scan_cosines(u, u, 2, keep_dense=False)
    own = scan["cand_a"] == np.arange(len(u))[:, None]
    # Of the two best, the one that is not the row itself (exact duplicates tie with it).
    return np.where(own[:, 0], scan["cos_a"][:, 1], scan["cos_a"][:, 0])


def weight_metrics(sae: SAE) -> dict:
    """`decoder_sim_mean`, `decoder_sim_dup_frac`, `enc_dec_cos_mean` and
    `enc_dec_cos_median` of the SAE's weights (module docstring)."""
    sim = max_other_cosine(np.asarray(sae.params["W_dec"], np.float32))
    out = {"decoder_sim_mean": float(np.mean(sim)) if len(sim) > 1 else None,
           "decoder_sim_dup_frac": (float(np.mean(sim >= DUPLICATE_COSINE))
                                    if len(sim) > 1 else None)}
    if sae.params["W_enc"].shape[::-1] != sae.params["W_dec"].shape:  # e.g. a CLT's
        return {**out, "enc_dec_cos_mean": None, "enc_dec_cos_median": None}
    enc = unit_vectors(np.asarray(sae.params["W_enc"], np.float64).T)
    dec = unit_vectors(np.asarray(sae.params["W_dec"], np.float64))
    cos = np.sum(enc * dec, axis=1)
    return {**out, "enc_dec_cos_mean": float(cos.mean()),
            "enc_dec_cos_median": float(np.median(cos))}


def decoder_init_cosine(sae: SAE, run_dir) -> float | None:
    """Mean cosine of each decoder row with its own initial direction: how far training
    moved the dictionary (1.0: not at all; ~0 for unrelated directions in d dimensions). An
    unconverged SAE keeps much of its random init, and then so do its "features".

    The init is re-created from the run's config and seed (`saes.init` is deterministic), so
    this needs a run trained here: None for an imported (`imported_from.json`) or pruned
    (`pruned_from.json`) run, whose rows have no init of ours."""
    run_dir = str(run_dir)
    if any(files.exists(files.join(run_dir, name)) for name in (IMPORTED_FROM, PRUNED_FROM)):
        return None
    init = saes.init(jax.random.key(sae.config.seed), sae.config, sae.d_in, None,
                     sae.d_out if sae.transcoder else None)["W_dec"]
    cos = np.sum(unit_vectors(np.asarray(init, np.float64))
                 * unit_vectors(np.asarray(sae.params["W_dec"], np.float64)), axis=1)
    return float(cos.mean())


def core_metrics(sae: SAE, rows, batch_size: int = 4096) -> dict:
    """Every core number (module docstring) of `sae` on `rows`, flat floats, one pass.

    Args:
      rows: a `store.RowSpan` or `loader.ArraySpan` (anything with `len`, `d_in`, `read`).
        For a transcoder, rows are input + target and every figure is about the target.
    """
    return {**row_metrics(eval_sums(sae, rows, batch_size), sae.d_out), **weight_metrics(sae)}


def suite(sae: SAE, store, args) -> dict:
    """The `sae-jax evals` core suite: the core metrics on the store's held-out rows (all of
    them with `args.split == "all"`) and what the model loses downstream (`downstream`).

    `args` may carry `split`, `fidelity_sequences`, `corpus`, `lm_batch` and `mesh` (eval's
    flags; defaults as eval's). Returns `{"metrics", "higher_is_better", "detail"}`: flat
    metrics, the direction of those a baseline can be compared on (`HIGHER_IS_BETTER`), and
    the L0 distribution, shrinkage by L0 and the downstream result."""
    opts = SimpleNamespace(fidelity_sequences=getattr(args, "fidelity_sequences",
                                                      FIDELITY_SEQUENCES),
                           corpus=getattr(args, "corpus", None),
                           lm_batch=getattr(args, "lm_batch", LM_BATCH))
    rows = (store.span() if getattr(args, "split", "heldout") == "all"
            else store.split(sae.config.holdout)[1])
    sums = eval_sums(sae, rows)
    lost = downstream(sae, store, opts, make_mesh(getattr(args, "mesh", "") or ""))
    metrics = {**row_metrics(sums, sae.d_out), **weight_metrics(sae), **recovered(lost)}
    metrics.pop("n_rows")
    return {"metrics": metrics,
            "higher_is_better": {k: v for k, v in HIGHER_IS_BETTER.items() if k in metrics},
            "detail": {"n_rows": sums["n"],
                       "shrinkage_by_l0": shrinkage_by_l0(sums["norm_ratio"], sums["l0"]),
                       **lost}}
