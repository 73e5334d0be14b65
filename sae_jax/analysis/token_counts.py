"""Which tokens each feature fires on: exact sparse counts of (feature, token id) pairs.

A dense (F, vocab) table is 3072 x 30522 x 4 B = 375 MB at the demo size and 120 GB at 1M
features, while the number of *distinct* pairs that actually occur is bounded by the number
of active (row, feature) pairs (N·L0) and in practice far smaller, because each feature fires
on few distinct tokens. Pairs are kept as a sorted int64 key array (feature << 32 | token)
with counts, merged every few batches. If the distinct pairs exceed `max_pairs`, each feature
is pruned to its `keep` most counted tokens and `exact` turns False (counts are then lower
bounds).
"""

from __future__ import annotations

import numpy as np


class TokenCounts:
    """Exact sparse (feature, token) counts as sorted int64 keys + counts, merged lazily.

    Args:
      max_pairs: distinct pairs kept before pruning.
      keep: tokens kept per feature when pruning (counts become lower bounds, `exact`
        False).
    """

    def __init__(self, max_pairs: int, keep: int):
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_pending = 0
        self.max_pairs, self.keep = max_pairs, keep
        self.exact = True

    def add(self, cols: np.ndarray, tokens: np.ndarray) -> None:
        keys, counts = np.unique((cols.astype(np.int64) << 32) | tokens.astype(np.int64),
                                 return_counts=True)
        self.pending.append((keys, counts))
        self.n_pending += len(keys)
        if self.n_pending > max(1 << 21, len(self.keys)):
            self._consolidate()

    def _consolidate(self) -> None:
        if not self.pending:
            return
        keys = np.concatenate([self.keys] + [p[0] for p in self.pending])
        counts = np.concatenate([self.counts] + [p[1] for p in self.pending])
        self.pending, self.n_pending = [], 0
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.counts = np.bincount(inverse, weights=counts, minlength=len(self.keys)).astype(
            np.int64)
        if len(self.keys) > self.max_pairs:
            self._prune()

    def _prune(self) -> None:
        """Keeps each feature's `keep` most counted tokens (counts become lower bounds)."""
        self.exact = False
        feat = self.keys >> 32
        order = np.lexsort((-self.counts, feat))  # by feature, then count descending
        feat_sorted = feat[order]
        starts = np.searchsorted(feat_sorted, feat_sorted, side="left")
        rank = np.arange(len(order)) - starts
        keep = np.sort(order[rank < self.keep])
        self.keys, self.counts = self.keys[keep], self.counts[keep]

    def top(self, n_top: int) -> dict[int, list[tuple[int, int]]]:
        """{feature column: [(token id, count), ...]} most counted first (ties: lower id)."""
        self._consolidate()
        feat = self.keys >> 32
        tok = self.keys & 0xFFFFFFFF
        order = np.lexsort((tok, -self.counts, feat))
        feat_s = feat[order]
        out: dict[int, list[tuple[int, int]]] = {}
        bounds = np.flatnonzero(np.diff(feat_s)) + 1
        for seg in np.split(order, bounds):
            if len(seg):
                seg = seg[:n_top]
                out[int(feat[seg[0]])] = [(int(t), int(c)) for t, c in
                                          zip(tok[seg], self.counts[seg])]
        return out
