"""Streamed means and variances equal the whole-array ones, even when the mean dwarfs the
spread."""

import numpy as np

from sae_jax.analysis.moments import merge_moments, rows_mean
from sae_jax.data.loader import ArraySpan


def test_merge_moments_equals_the_whole():
    rng = np.random.default_rng(0)
    x = 1e3 + rng.standard_normal((1000, 3))
    n, mean, m2 = 0, np.zeros(3), np.zeros(3)
    for part in np.array_split(x, [10, 400, 401]):
        n, mean, m2 = merge_moments(n, mean, m2, len(part), part.mean(0),
                                    np.square(part - part.mean(0)).sum(0))
    assert n == 1000
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m2 / n, x.var(0), rtol=1e-9)


def test_rows_mean():
    x = np.random.default_rng(1).standard_normal((1001, 4)).astype(np.float32)
    np.testing.assert_allclose(rows_mean(ArraySpan(x), batch=100), x.astype(np.float64).mean(0),
                               rtol=1e-10)
    np.testing.assert_allclose(rows_mean(ArraySpan(x), slice(2, None), batch=7),
                               x[:, 2:].astype(np.float64).mean(0), rtol=1e-10)
