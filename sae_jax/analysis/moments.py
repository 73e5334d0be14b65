"""Means and variances of data streamed in batches, merged on the host in float64.

Each batch reports its own mean and sum of squared deviations from that mean (centred, on
the device in float32); `merge_moments` combines them with Chan, Golub & LeVeque's pairwise
update. The textbook Σx² − (Σx)²/n in float32 cancels catastrophically when the mean is
large against the spread (mean 1e3, std 1 loses every digit); centred moments do not.
"""

from __future__ import annotations

import numpy as np

MEAN_BATCH_ROWS = 65536


def merge_moments(n_a: int, mean_a, m2_a, n_b: int, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, sum of squared deviations) summaries.

    Returns `(n, mean, m2)` of the union; means and m2s may be arrays (per column)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + np.square(delta) * (n_a * n_b / n)
    return n, mean, m2


def rows_mean(rows, columns: slice = slice(None), batch: int = MEAN_BATCH_ROWS) -> np.ndarray:
    """Mean of a `RowSpan`'s rows (of their `columns`), float64, read `batch` rows at a time
    and merged centred (a running mean, as `merge_moments` does with m2 left out)."""
    count, mean = 0, np.zeros(rows.d_in)[columns]
    for i in range(0, len(rows), batch):
        x = np.asarray(rows.read(i, i + batch)[:, columns], np.float64)
        count += len(x)
        mean = mean + (x.mean(0) - mean) * (len(x) / count)
    return mean
