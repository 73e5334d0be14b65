"""Object-store paths: the code that serves `gs://` run directories and stores, exercised
through tensorstore's `memory://` key-value store (same code path, no network)."""

import json

import numpy as np
import pytest

from sae_jax import files
from sae_jax.config import make_config
from sae_jax.data.store import StoreWriter, open_store
from sae_jax.errors import UserError
from sae_jax.rundir import DataStats, prepare_run, read_run


def test_small_files_round_trip():
    path = "memory://bucket/a/b.json"
    assert files.read_text(path) is None and not files.exists(path)
    files.write_text(path, '{"x": 1}')
    assert json.loads(files.read_text(path)) == {"x": 1} and files.exists(path)
    assert files.join("memory://bucket/", "a", "b.json") == path


def test_store_on_an_object_store():
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    with StoreWriter("memory://bucket/store", d_in=3, chunk_rows=4) as writer:
        writer.append(rows[:6])
        writer.append(rows[6:])
    store = open_store("memory://bucket/store")
    np.testing.assert_array_equal(store.span().read(0, 10), rows)
    with pytest.raises(UserError, match="already holds a store"):
        StoreWriter("memory://bucket/store", d_in=3)


def test_failed_write_on_an_object_store_leaves_no_store():
    with pytest.raises(RuntimeError):
        with StoreWriter("memory://bucket/broken", d_in=3) as writer:
            writer.append(np.ones((5, 3), np.float32))
            raise RuntimeError("interrupted")
    assert not files.exists("memory://bucket/broken/meta.json")
    with pytest.raises(UserError, match="no activation store"):
        open_store("memory://bucket/broken")


def test_run_record_on_an_object_store():
    store_rows = np.ones((8, 3), np.float32)
    with StoreWriter("memory://bucket/s3", d_in=3) as writer:
        writer.append(store_rows)
    store = open_store("memory://bucket/s3")
    cfg = make_config(width=16, k=2)
    stats = lambda: DataStats(2.0, np.zeros(3, np.float32))  # noqa: E731
    info = prepare_run("memory://bucket/runs/r1", cfg, store, stats)
    assert read_run("memory://bucket/runs/r1") == info
    assert info.data_dir == "memory://bucket/s3"
    with pytest.raises(UserError, match="different config"):
        prepare_run("memory://bucket/runs/r1", make_config(width=16, k=3), store, stats)
