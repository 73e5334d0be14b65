"""`sae_jax.data.loader`: the shuffled batch order, Grain iteration, and input statistics.

Most tests use rows that are their own index (row i = [i, i, i]), so a batch's first
column says exactly which rows it holds.
"""

import numpy as np
import pytest
from conftest import batch_at

from sae_jax.config import make_config
from sae_jax.data import loader
from sae_jax.data.loader import ArraySpan, BatchOrder, BatchSource, batches, estimate_stats
from sae_jax.data.store import open_store
from sae_jax.errors import UserError


def index_rows(n: int, d: int = 3) -> np.ndarray:
    return np.arange(n, dtype=np.float32)[:, None].repeat(d, 1)


def ids(batch: np.ndarray) -> np.ndarray:
    """The row indices in a batch of `index_rows`, checking every column agrees."""
    assert (batch == batch[:, :1]).all()
    return batch[:, 0].astype(np.int64)


def small_windows(monkeypatch, blocks: int, block_rows: int, d: int = 3) -> None:
    """Makes BatchSource group `blocks` blocks per window (instead of ~128 MiB of rows)."""
    monkeypatch.setattr(loader, "WINDOW_BYTES", blocks * block_rows * d * 4)


# (n_rows, block_rows, batch_size, blocks per window or None for one window per epoch)
EPOCH_CASES = [
    (1024, 128, 128, None),  # everything divides
    (1003, 128, 64, None),  # ragged last block; batches cross the epoch boundary
    (1000, 100, 300, None),  # batch_size does not divide the epoch
    (517, 64, 1000, None),  # a batch spans about two epochs
    (1003, 128, 96, 3),  # several windows, ragged last block somewhere in the order
    (999, 50, 77, 1),  # a window per block
    (5, 128, 3, None),  # fewer rows than a block
]


@pytest.mark.parametrize("n, block_rows, batch_size, window", EPOCH_CASES)
def test_every_epoch_visits_every_row_once(monkeypatch, n, block_rows, batch_size, window):
    if window is not None:
        small_windows(monkeypatch, window, block_rows)
    epochs = 3
    steps = -(-epochs * n // batch_size)
    source = BatchSource(ArraySpan(index_rows(n)), batch_size, seed=7, num_batches=steps,
                         block_rows=block_rows)
    if window is not None:
        assert source.order.window_blocks == window
    got = [source[s] for s in range(steps)]
    assert all(b.shape == (batch_size, 3) and b.dtype == np.float32 for b in got)
    order = np.concatenate([ids(b) for b in got])
    for e in range(epochs):
        np.testing.assert_array_equal(np.sort(order[e * n:(e + 1) * n]), np.arange(n))
    if n > batch_size:  # epochs are shuffled differently
        assert not np.array_equal(order[:n], order[n:2 * n])
    if n % batch_size:  # the checks above did include batches that cross an epoch boundary
        assert any(s * batch_size // n != ((s + 1) * batch_size - 1) // n for s in range(steps))


def test_batch_order_windows_cover_the_epoch():
    order = BatchOrder(n_rows=1003, block_rows=128, window_blocks=3, seed=1)
    assert order.n_blocks == 8
    blocks, starts = order.windows(0)
    assert sorted(blocks) == list(range(8))
    # windows of 3, 3, 2 blocks; the short (3-row) block 7 sits in one of them
    sizes = [sum(min(128, 1003 - 128 * k) for k in blocks[i:i + 3]) for i in (0, 3, 6)]
    np.testing.assert_array_equal(starts, np.concatenate([[0], np.cumsum(sizes)]))
    assert starts[-1] == 1003
    # blocks are regrouped every epoch, differently for another seed, the same for this one
    assert not np.array_equal(order.windows(1)[0], blocks)
    assert not np.array_equal(BatchOrder(1003, 128, 3, seed=2).windows(0)[0], blocks)
    np.testing.assert_array_equal(BatchOrder(1003, 128, 3, seed=1).windows(0)[0], blocks)
    segments = list(order.segments(1000, 1010))  # across the end of epoch 0
    assert sum(b - a for _, _, a, b in segments) == 10
    assert segments[0][:2] == (0, 2) and segments[-1][:2] == (1, 0)


def test_order_is_deterministic_for_a_seed_and_random_access():
    rows = index_rows(2000)

    def source(seed):
        return BatchSource(ArraySpan(rows), 96, seed, 100, block_rows=128)

    a, b = source(3), source(3)
    sequential = [ids(a[s]) for s in range(45)]  # ~2 epochs
    for s in [44, 0, 21, 20, 43, 1]:  # a fresh source in any order: a pure function of step
        np.testing.assert_array_equal(ids(b[s]), sequential[s])
    other = source(4)
    assert not np.array_equal(ids(other[0]), sequential[0])
    assert sum(np.array_equal(ids(other[s]), sequential[s]) for s in range(45)) == 0


def test_batches_mix_rows_from_many_blocks(monkeypatch):
    n, block_rows, batch_size = 10_000, 128, 256
    source = BatchSource(ArraySpan(index_rows(n)), batch_size, 0, 60, block_rows=block_rows)
    for s in range(n // batch_size):
        rows = ids(source[s])
        assert len(set(rows // block_rows)) >= 4
        assert len(set(rows // block_rows)) >= 32  # one window: the blocks are well mixed
        assert not (np.diff(rows) == 1).all()
    first = ids(source[0])
    assert first.max() - first.min() > n // 2  # rows far apart in the corpus

    small_windows(monkeypatch, 8, block_rows)  # windows of 8 blocks = 1024 rows
    source = BatchSource(ArraySpan(index_rows(n)), batch_size, 0, 60, block_rows=block_rows)
    for s in range(n // batch_size):
        assert len(set(ids(source[s]) // block_rows)) >= 4


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(count):
    rows = index_rows(1003)
    whole = BatchSource(ArraySpan(rows), 96, 5, 40, block_rows=128)
    parts = [BatchSource(ArraySpan(rows), 96, 5, 40, process_index=p, process_count=count,
                         block_rows=128) for p in range(count)]
    for s in [0, 1, 10, 11, 12, 20, 39]:  # steps 10 and 20 cross an epoch boundary
        shares = [p[s] for p in parts]
        assert all(x.shape == (96 // count, 3) for x in shares)
        np.testing.assert_array_equal(np.concatenate(shares), whole[s])
        if s * 96 // 1003 == (s * 96 + 95) // 1003:  # within one epoch: shares are disjoint
            assert len(set(np.concatenate([ids(x) for x in shares]))) == 96


@pytest.mark.parametrize("start", [0, 5, 11, 12])
def test_grain_batches_yield_source_items_from_start(start):
    rows = index_rows(700)
    source = BatchSource(ArraySpan(rows), 64, 2, num_batches=12, block_rows=128)
    reference = BatchSource(ArraySpan(rows), 64, 2, num_batches=12, block_rows=128)
    got = list(batches(source, start))
    assert len(got) == 12 - start
    for s, batch in enumerate(got, start):
        np.testing.assert_array_equal(np.asarray(batch), reference[s])


def test_batch_at_agrees_with_train_loading(synthetic, synthetic_store):
    """`batch_at` over the train split's rows == BatchSource over the store as `train` builds it."""
    cfg = make_config(batch_size=512, seed=3, steps=200)
    store = open_store(synthetic_store)
    train_rows, _ = store.split(cfg.holdout)
    source = BatchSource(train_rows, cfg.batch_size, cfg.seed, cfg.steps,
                         block_rows=store.meta["chunk_rows"])
    rows = synthetic[0][:len(train_rows)]
    for s in [0, 1, 74, 75, 199]:  # 38000 rows = 74.2 batches: step 74 crosses epochs
        np.testing.assert_array_equal(batch_at(rows, cfg, s), source[s])
    # over all 40k rows (held-out tail included) the order is a different one
    assert not np.array_equal(batch_at(synthetic[0], cfg, 0), source[0])


# ---------------------------------------------------------------- estimate_stats


def test_estimate_stats_known_norm():
    rng = np.random.default_rng(0)
    n, d = 800, 16  # fewer rows than a stats block: the whole array is sampled
    x = rng.standard_normal((n, d))
    x = (2.0 * x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    scale, mean = estimate_stats(ArraySpan(x))
    assert scale == pytest.approx(np.sqrt(d / 4.0), rel=1e-5)  # every row has norm 2
    assert np.mean(np.sum((scale * x.astype(np.float64)) ** 2, axis=1)) == pytest.approx(
        d, rel=1e-3)
    assert mean.dtype == np.float32 and mean.shape == (d,)
    np.testing.assert_allclose(mean, scale * x.mean(0), rtol=1e-5, atol=1e-7)


def test_estimate_stats_offset_data():
    rng = np.random.default_rng(1)
    n, d = 64 * 1024, 4  # 64 blocks of 1024 rows tile the array exactly
    x = (3.0 * rng.standard_normal((n, d)) + np.array([1, -2, 0.5, 4])).astype(np.float32)
    scale, mean = estimate_stats(ArraySpan(x))
    assert np.mean(np.sum((scale * x.astype(np.float64)) ** 2, axis=1)) == pytest.approx(
        d, rel=1e-3)
    np.testing.assert_allclose(mean, scale * x.astype(np.float64).mean(0), rtol=1e-4)


def test_estimate_stats_samples_the_whole_span():
    """64 blocks spread evenly: half over rows of squared norm 1, half over norm 9."""
    n, d = 200_000, 2
    x = np.zeros((n, d), np.float32)
    x[:n // 2, 0] = 1.0
    x[n // 2:, 1] = 3.0
    scale, mean = estimate_stats(ArraySpan(x))
    assert scale == pytest.approx(np.sqrt(d / 5.0), rel=1e-6)
    np.testing.assert_allclose(mean, [scale * 0.5, scale * 1.5], rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, np.nan, np.inf])
def test_estimate_stats_refuses_degenerate_data(bad):
    x = np.full((300, 4), bad, np.float32)
    with pytest.raises(UserError, match="cannot scale the inputs: their mean squared norm is"):
        estimate_stats(ArraySpan(x))


# ---------------------------------------------------------------- a real store


@pytest.mark.parametrize("window", [None, 2])
def test_store_rowspan_gives_the_same_batches_as_memory(monkeypatch, synthetic,
                                                       synthetic_store, window):
    store = open_store(synthetic_store)
    block_rows = store.meta["chunk_rows"]
    if window is not None:
        small_windows(monkeypatch, window, block_rows, d=store.d_in)
    train_rows, held = store.split(0.05)
    assert (len(train_rows), len(held)) == (38_000, 2_000)
    in_memory = train_rows.read(0, len(train_rows))
    np.testing.assert_array_equal(in_memory, synthetic[0][:38_000])
    from_store = BatchSource(train_rows, 512, 1, 200, block_rows=block_rows)
    from_memory = BatchSource(ArraySpan(in_memory), 512, 1, 200, block_rows=block_rows)
    for s in [0, 1, 73, 74, 75, 150]:
        a, b = from_store[s], from_memory[s]
        assert a.shape == (512, 32) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    for p in range(2):
        np.testing.assert_array_equal(
            BatchSource(train_rows, 512, 1, 200, p, 2, block_rows=block_rows)[74],
            from_memory[74][p * 256:(p + 1) * 256])
    s_store, m_store = estimate_stats(train_rows)
    s_mem, m_mem = estimate_stats(ArraySpan(in_memory))
    assert s_store == s_mem
    np.testing.assert_array_equal(m_store, m_mem)
