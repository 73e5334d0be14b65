"""Activation correlation of two SAEs' features over shared rows (for `compare`).

The Pearson correlation over token rows of f^A_i(x) and f^B_π(i)(x') for each one-to-one
pair (`matching`), where x are rows of DATA and x' the same rows of DATA_B (default x' = x; a
second store lets SAEs of two models, e.g. before and after fine-tuning, each read their own
activations of the same tokens). Undefined (null) when either feature is constant on the
rows (typically: never fires). Streaming: each batch's centred moments (on the device,
float32) are merged on the host in float64 (`moments.merge_moments`), never storing an
(N, F) matrix. With `cross` the full F_A × F_B cross-covariance is kept too, giving each
feature's *best-correlated partner* (any feature of the other SAE).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.analysis.moments import merge_moments
from sae_jax.batches import padded_batches
from sae_jax.errors import UserError

DEFAULT_MAX_ROWS = 20_000


@functools.partial(jax.jit, static_argnames=("cross",))
def _moments(sae_a, sae_b, x_a, x_b, partner, n_valid, *, cross: bool) -> dict:
    """One batch's centred moments of both SAEs' activations (float32, on the device); rows
    from `n_valid` on are fill."""
    valid = (jnp.arange(x_a.shape[0]) < n_valid)[:, None]
    f_a = jnp.where(valid, sae_a.encode_raw(x_a), 0.0)
    f_b = jnp.where(valid, sae_b.encode_raw(x_b), 0.0)
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
    """Chan et al.'s merge (`moments.merge_moments`) of both SAEs' moments, in float64, with
    the cross terms: `partner` pairs each A feature with the B feature of its `c_pair`."""
    batch = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    if acc is None:
        return {"n": n_b, **batch}
    n_a, n = acc["n"], acc["n"] + n_b
    w = n_a * n_b / n
    d_a, d_b = batch["mean_a"] - acc["mean_a"], batch["mean_b"] - acc["mean_b"]
    out = {"n": n, "fires_a": acc["fires_a"] + batch["fires_a"],
           "fires_b": acc["fires_b"] + batch["fires_b"],
           "c_pair": acc["c_pair"] + batch["c_pair"] + d_a * d_b[partner] * w}
    for s in ("a", "b"):
        _, out[f"mean_{s}"], out[f"m2_{s}"] = merge_moments(
            n_a, acc[f"mean_{s}"], acc[f"m2_{s}"], n_b, batch[f"mean_{s}"], batch[f"m2_{s}"])
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
    partner_dev = jnp.asarray(partner_safe, jnp.int32)
    acc = None
    # A transcoder's rows hold its input then its target; it encodes the input only.
    inputs = [lambda lo, hi, r=r, w=_encoder_width(sae): r.read(lo, hi)[:, :w].astype(np.float32)
              for r, sae in ((rows, sae_a), (rows_b, sae_b))]
    for batch in padded_batches(n, batch_size, *inputs):
        out = jax.device_get(_moments(sae_a, sae_b, *batch.arrays, partner_dev, batch.n_valid,
                                      cross=cross))
        acc = _merge_moments(acc, batch.n_valid, out, partner_safe)
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
