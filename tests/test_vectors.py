"""The one unit-vector helper: exact normalisation, no epsilon, zero vectors stay zero."""

import numpy as np

from sae_jax.vectors import unit_vectors


def test_unit_vectors():
    a = np.array([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0], [-2.0, 0.0]], np.float32)
    u = unit_vectors(a)
    assert u.dtype == np.float64
    np.testing.assert_allclose(u, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(unit_vectors(np.array([0.0, 2.0])), [0.0, 1.0])
    cols = unit_vectors(np.array([[3.0, 0.0], [4.0, 0.0]]), axis=0)
    np.testing.assert_allclose(cols, [[0.6, 0.0], [0.8, 0.0]])
