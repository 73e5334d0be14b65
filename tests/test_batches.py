"""Fixed-shape padded batches: every batch has one shape, fill rows are marked, and sources
of every kind (arrays, row spans, callables, streams) give the same batches."""

import itertools

import numpy as np
import pytest

from sae_jax.batches import batch_rows, pad_rows, padded_batches
from sae_jax.data.loader import ArraySpan
from sae_jax.errors import UserError


def test_batch_rows():
    assert batch_rows(10_000, 4096) == 4096
    assert batch_rows(4096, 4096) == 4096
    assert [batch_rows(n, 64) for n in (1, 2, 3, 5, 33, 63)] == [1, 2, 4, 8, 64, 64]
    assert batch_rows(None, 64) == 64
    with pytest.raises(UserError, match="at least 1"):
        batch_rows(5, 0)


def test_pad_rows():
    a = np.arange(6, dtype=np.int32).reshape(3, 2)
    assert pad_rows(a, 3) is a
    padded = pad_rows(a, 5, fill=-1)
    assert padded.dtype == np.int32 and padded.tolist() == [[0, 1], [2, 3], [4, 5], [-1, -1],
                                                            [-1, -1]]


def test_every_batch_has_one_shape_and_covers_the_rows_once():
    x = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    ids = np.arange(23)
    batches = list(padded_batches(23, 8, x, ArraySpan(x), lambda lo, hi: (ids[lo:hi],)))
    assert [(b.start, b.n_valid) for b in batches] == [(0, 8), (8, 8), (16, 7)]
    assert {a.shape for b in batches for a in b.arrays[:2]} == {(8, 3)}
    last = batches[-1]
    np.testing.assert_array_equal(last.arrays[0][:7], x[16:])
    np.testing.assert_array_equal(last.arrays[1], last.arrays[0])  # the span reads the same
    assert not last.arrays[0][7:].any() and last.arrays[2].tolist() == [*range(16, 23), 0]
    rebuilt = np.concatenate([b.arrays[0][:b.n_valid] for b in batches])
    np.testing.assert_array_equal(rebuilt, x)


def test_fill_values_and_attention_mask():
    ids = np.ones((3, 4), np.int32)
    mask = np.ones((3, 4), np.int32)
    pos = np.zeros((3, 4), np.int32)
    (b,) = padded_batches(3, 16, ids, mask, pos, fill=(0, 0, -1), attend=1)
    assert b.n_valid == 3 and b.arrays[0].shape == (4, 4)  # 3 rows -> a batch of 4
    assert b.arrays[1][3].tolist() == [1, 0, 0, 0]  # a fill row attends to one key
    assert b.arrays[2][3].tolist() == [-1] * 4
    assert mask.tolist() == [[1] * 4] * 3  # the caller's arrays are not written to


def test_a_stream_ends_at_its_first_short_read():
    def stream(n):
        it = iter(range(n))
        return lambda lo, hi: np.array(list(itertools.islice(it, hi - lo)), np.int64)

    batches = list(padded_batches(None, 4, stream(10), fill=-1))
    assert [(b.start, b.n_valid) for b in batches] == [(0, 4), (4, 4), (8, 2)]
    assert batches[-1].arrays[0].tolist() == [8, 9, -1, -1]
    assert [b.n_valid for b in padded_batches(None, 4, stream(8))] == [4, 4]
    assert list(padded_batches(0, 4, np.zeros((0, 2)))) == []
