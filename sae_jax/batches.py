"""Fixed-shape batches, so that a jitted pass over many rows compiles once.

A pass over n rows in batches of `size` ends with a short batch; given to a jitted function
as is, it compiles the function a second time (tens of seconds for a model on a TPU). Every
stage that streams rows through `jit` (harvest, eval, the catalog, coverage, the audit, ...)
gets its batches from `padded_batches`: each batch has exactly the same number of rows, the
last one completed with fill rows, and says how many of its rows are real.

Rows per batch: `size`, or for fewer than `size` rows in all the power of two at or above
their count (`batch_rows`), so a small input is not padded to a large batch and inputs of
varying small sizes (the texts of successive `features` requests) share a few shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from sae_jax.errors import UserError


@dataclass(frozen=True)
class Batch:
    """One fixed-shape batch.

    Attributes:
      start: index of its first row in the whole pass.
      n_valid: its rows `[0, n_valid)` are real; the rest are fill.
      arrays: one `(rows, ...)` array per source, in the order given.
    """

    start: int
    n_valid: int
    arrays: tuple[np.ndarray, ...]


def batch_rows(n: int | None, size: int) -> int:
    """Rows per batch for a pass over `n` rows (None: unknown): `size`, or the power of two at
    or above `n` when that is smaller."""
    if size < 1:
        raise UserError(f"batch size must be at least 1, got {size}")
    if n is None or n >= size:
        return size
    return min(size, 1 << max(0, (n - 1).bit_length()))


def pad_rows(a: np.ndarray, rows: int, fill=0) -> np.ndarray:
    """`a` completed to `rows` rows with rows of `fill` (returned as is if already full)."""
    a = np.asarray(a)
    if len(a) >= rows:
        return a
    return np.concatenate([a, np.full((rows - len(a), *a.shape[1:]), fill, a.dtype)])


Source = np.ndarray | Callable[[int, int], np.ndarray | tuple[np.ndarray, ...]]


def _read(source, start: int, stop: int) -> tuple[np.ndarray, ...]:
    if hasattr(source, "read"):  # a RowSpan / ArraySpan
        return (np.asarray(source.read(start, stop)),)
    if callable(source):
        out = source(start, stop)
        return tuple(out) if isinstance(out, tuple) else (out,)
    return (np.asarray(source[start:stop]),)


def padded_batches(n: int | None, size: int, *sources: Source, fill=0,
                   attend: int | None = None) -> Iterator[Batch]:
    """Batches of `batch_rows(n, size)` rows over the first `n` rows of `sources`.

    Args:
      n: rows to cover; None: a stream, which ends at the first batch a source fills only
        partly (a callable source returning fewer rows than asked).
      size: the most rows per batch.
      sources: arrays (sliced along axis 0), row spans (anything with `read(start, stop)`) or
        callables `(start, stop) -> array or tuple of arrays`; all give the same rows.
      fill: the value of fill rows: a scalar, or a tuple with one per array.
      attend: index of the array that is an attention mask: its fill rows get one key
        (column 0), so a model's attention over them stays defined.

    Yields:
      `Batch`es, in order.
    """
    rows = batch_rows(n, size)
    start = 0
    while n is None or start < n:
        stop = start + rows if n is None else min(n, start + rows)
        arrays = tuple(a for s in sources for a in _read(s, start, stop))
        m = len(arrays[0])
        if m == 0:
            return
        fills = fill if isinstance(fill, tuple) else (fill,) * len(arrays)
        padded = tuple(pad_rows(a, rows, f) for a, f in zip(arrays, fills))
        if attend is not None and m < rows:
            padded[attend][m:, 0] = 1
        yield Batch(start, m, padded)
        if m < stop - start:
            return
        start += m
