"""Unit vectors: the one normalisation used for directions, embeddings and concepts.

The norm is taken in float64 and a vector is divided by it exactly; only a vector whose norm
is 0 (all zeros, or so small that its squares underflow float64) is left as the zero vector.
No epsilon is added to the norm: an epsilon shrinks short vectors instead of normalising
them (a decoder row of norm 1e-13 would come out with norm 0.1 under `max(norm, 1e-12)`),
and a zero vector has no direction to give, so 0 -- cosine 0 with everything -- is the
honest answer.
"""

from __future__ import annotations

import numpy as np


def unit_vectors(a, axis: int = -1) -> np.ndarray:
    """`a / ‖a‖` along `axis`, float64; zero vectors stay zero (module docstring)."""
    a = np.asarray(a, np.float64)
    norms = np.linalg.norm(a, axis=axis, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)
