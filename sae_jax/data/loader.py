"""Shuffled training batches from a store, as a Grain random-access source.

**Order.** Rows are stored in harvest order, so neighbours share a document. Each epoch
permutes the store's *blocks* (chunk-sized runs of rows), groups consecutive permuted
blocks into *windows* (~`WINDOW_BYTES`), and permutes the rows inside each window; batches
are consecutive slices of that order. A batch therefore mixes rows from many blocks far
apart in the corpus, while every read is a whole contiguous block (Grain costs ~20 µs per
element, so elements here are whole batches, never rows). The trade-off: consecutive
batches of one window share its blocks; a window is a few hundred thousand rows at d=384.

**Resume.** Batch `s` is a pure function of `(seed, s)`: a resumed run needs only the
step to see exactly the batches an uninterrupted run would have seen (no iterator state).

**Processes.** Each process reads only its `1/process_count` slice of every global batch.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import grain
import numpy as np

WINDOW_BYTES = 128 << 20
STATS_BLOCKS, STATS_BLOCK_ROWS = 64, 1024


@dataclass(frozen=True)
class ArraySpan:
    """An in-memory (or memory-mapped) array with the `RowSpan` interface."""

    array: np.ndarray

    def __len__(self) -> int:
        return len(self.array)

    @property
    def d_in(self) -> int:
        return int(self.array.shape[1])

    def read(self, i: int, j: int) -> np.ndarray:
        return np.asarray(self.array[max(0, i):min(len(self), j)])

    def read_many(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        return [self.read(i, j) for i, j in ranges]


@dataclass(frozen=True)
class BatchOrder:
    """The row order of every epoch: permuted blocks, grouped in windows, rows permuted
    within each window. Pure: the same arguments always give the same order."""

    n_rows: int
    block_rows: int
    window_blocks: int
    seed: int

    @functools.cached_property
    def n_blocks(self) -> int:
        return -(-self.n_rows // self.block_rows)

    @functools.lru_cache(maxsize=4)
    def windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permuted block ids, start offset of each window in the epoch's order)."""
        blocks = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        sizes = np.minimum(self.block_rows, self.n_rows - blocks * self.block_rows)
        window_sizes = np.add.reduceat(sizes, np.arange(0, len(blocks), self.window_blocks))
        return blocks, np.concatenate([[0], np.cumsum(window_sizes)])

    def window_blocks_of(self, epoch: int, window: int) -> np.ndarray:
        blocks, _ = self.windows(epoch)
        return blocks[window * self.window_blocks:(window + 1) * self.window_blocks]

    def window_permutation(self, epoch: int, window: int, size: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, window, 1]).permutation(size)

    def segments(self, start: int, stop: int):
        """Yields `(epoch, window, a, b)`: positions [start, stop) of the endless order as
        slices [a, b) of windows."""
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, self.n_rows)
            _, starts = self.windows(epoch)
            window = int(np.searchsorted(starts, offset, side="right") - 1)
            a = offset - starts[window]
            b = min(starts[window + 1] - starts[window], a + stop - pos)
            yield epoch, window, int(a), int(b)
            pos += b - a


class BatchSource:
    """Grain random-access source: element `s` is this process's share of batch `s`.

    Args:
      span: the training rows (a `store.RowSpan` or `ArraySpan`: `len`, `d_in`, `read_many`).
      batch_size: rows per *global* batch.
      seed: data-order seed.
      num_batches: length of the source (the run's steps).
      process_index, process_count: this process's slice of each global batch.
      block_rows: rows per contiguous read (the store's chunk size).
    """

    def __init__(self, span, batch_size: int, seed: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1, block_rows: int = 4096):
        self.span, self.num_batches = span, num_batches
        self.share = batch_size // process_count
        self.offset = process_index * self.share
        self.batch_size = batch_size
        row_bytes = span.d_in * 4
        window_blocks = max(1, WINDOW_BYTES // (block_rows * row_bytes))
        self.order = BatchOrder(len(span), block_rows, window_blocks, seed)
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, step: int) -> np.ndarray:
        start = step * self.batch_size + self.offset
        parts = [self._window(e, w)[a:b] for e, w, a, b in
                 self.order.segments(start, start + self.share)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _window(self, epoch: int, window: int) -> np.ndarray:
        """The window's rows in shuffled order; the two most recent windows are cached."""
        key = (epoch, window)
        with self._lock:
            if key not in self._cache:
                blocks = self.order.window_blocks_of(epoch, window)
                b = self.order.block_rows
                # all blocks at once: checksumming and decoding run on every core
                rows = np.concatenate(self.span.read_many([(k * b, (k + 1) * b) for k in blocks]))
                self._cache[key] = rows[self.order.window_permutation(epoch, window, len(rows))]
                while len(self._cache) > 2:
                    self._cache.pop(next(iter(self._cache)))
            return self._cache[key]


def batches(source: BatchSource, start: int, prefetch: int = 2):
    """Iterates `source[start:]` with Grain, prefetching `prefetch` batches in a thread."""
    ds = grain.MapDataset.source(source)[start:]
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def stats_sample(span) -> np.ndarray:
    """`STATS_BLOCKS` evenly spread blocks of rows, float32: what the input scale and the
    data mean are estimated from."""
    starts = np.linspace(0, max(0, len(span) - STATS_BLOCK_ROWS), STATS_BLOCKS).astype(int)
    sample = np.concatenate(span.read_many([(s, s + STATS_BLOCK_ROWS) for s in np.unique(starts)]))
    return sample.astype(np.float32)


def scale_and_mean(sample: np.ndarray) -> tuple[float, np.ndarray]:
    """Scale c with E‖c·x‖² = d over the rows x of `sample (n, d)`, and the mean of c·x."""
    from sae_jax.errors import UserError

    mean_sq_norm = float(np.mean(np.sum(np.square(sample, dtype=np.float64), axis=1)))
    if not np.isfinite(mean_sq_norm) or mean_sq_norm == 0:
        raise UserError("cannot scale the inputs: their mean squared norm is "
                        f"{mean_sq_norm} (all zeros or non-finite?)")
    scale = float(np.sqrt(sample.shape[1] / mean_sq_norm))
    return scale, (sample.mean(0) * scale).astype(np.float32)


def estimate_stats(span, columns: slice = slice(None)) -> tuple[float, np.ndarray]:
    """Input scale c with E‖c·x‖² = d_in, and the mean of c·x, from evenly spread blocks.

    Args:
      columns: which columns of the rows are x (a transcoder store's input or target half).

    Returns:
      `(scale, scaled_mean)`.
    """
    return scale_and_mean(stats_sample(span)[:, columns])

