"""Evaluation of a trained SAE on held-out rows, streamed in batches.

Reports reconstruction (MSE, FVU, explained variance), sparsity (L0 mean and quantiles)
and feature health (dead: never fired on the eval rows; dense: fires on > 10% of them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import saes
from sae_jax.errors import UserError
from sae_jax.sae import SAE

DENSE_FREQUENCY = 0.1


def _batch_sums(sae: SAE):
    """Jitted per-batch sufficient statistics in float32 (totals are summed on the host)."""

    def sums(params, x):
        f = saes.encode(params, x * sae.input_scale, sae.config).f
        x_hat = saes.decode(params, f) / sae.input_scale
        active = f > 0
        return {
            "sq_err": jnp.sum(jnp.square(x - x_hat)),
            "sum_x": jnp.sum(x, axis=0),
            "sum_x2": jnp.sum(jnp.square(x), axis=0),
            "l0": active.sum(-1),
            "fires": active.sum(0),
        }

    return jax.jit(sums)


def evaluate(sae: SAE, rows, batch_size: int = 4096) -> dict:
    """Evaluates `sae` on raw activation rows, reading `batch_size` rows at a time.

    Args:
      rows: a `store.RowSpan` or `loader.ArraySpan` (anything with `len`, `d_in`, `read`).

    Returns:
      A dict of floats: `mse` (mean per element, raw units), `fvu`, `explained_variance`,
      `l0`, `l0_p10/p50/p90`, `dead_frac`, `dense_frac`, `n_rows`.
    """
    if rows.d_in != sae.d_in:
        raise UserError(f"eval data has d_in={rows.d_in}, but the SAE expects d_in={sae.d_in}")
    stats = _batch_sums(sae)
    n, d = len(rows), rows.d_in
    sq_err, sum_x, sum_x2 = 0.0, np.zeros(d), np.zeros(d)
    fires, l0s = np.zeros(sae.width, np.int64), []
    for start in range(0, n, batch_size):
        x = jnp.asarray(rows.read(start, start + batch_size).astype(np.float32))
        out = jax.device_get(stats(sae.params, x))
        sq_err += float(out["sq_err"])
        sum_x += out["sum_x"]
        sum_x2 += out["sum_x2"]
        fires += out["fires"]
        l0s.append(out["l0"])
    total_var = float(np.sum(sum_x2 - sum_x**2 / n))
    l0 = np.concatenate(l0s)
    freq = fires / n
    fvu = sq_err / total_var if total_var > 0 else float("nan")
    return {
        "n_rows": int(n),
        "mse": sq_err / (n * d),
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": float(l0.mean()),
        "l0_p10": float(np.percentile(l0, 10)),
        "l0_p50": float(np.percentile(l0, 50)),
        "l0_p90": float(np.percentile(l0, 90)),
        "dead_frac": float(np.mean(fires == 0)),
        "dense_frac": float(np.mean(freq > DENSE_FREQUENCY)),
    }
