"""Multi-source stores from `sae-jax import A B DATA_DIR`: aligned sources side by side in
each row, recorded in `meta["sources"]`, for crosscoders."""

import json

import numpy as np
import pytest
from conftest import json_result, one_error_line, sae_jax_cli
from safetensors.numpy import save_file

from sae_jax.data import importers
from sae_jax.data.importers import import_activations
from sae_jax.data.store import open_store
from sae_jax.errors import UserError


def randn(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_sources_side_by_side_across_file_boundaries(tmp_path, monkeypatch):
    """Source A is a folder split 7 + 23 rows, source B one file; chunks of 4 rows cross
    A's file boundary, and every row still pairs A's row i with B's row i."""
    monkeypatch.setattr(importers, "CHUNK_ROWS", 4)
    a, b = randn(30, 3, 0), randn(30, 5, 1)
    (tmp_path / "base").mkdir()
    np.save(tmp_path / "base/00.npy", a[:7])
    save_file({"x": a[7:]}, str(tmp_path / "base/01.safetensors"))
    np.save(tmp_path / "chat.npy", b)
    store = import_activations([tmp_path / "base", tmp_path / "chat.npy"], tmp_path / "store")
    np.testing.assert_array_equal(store.rows.read().result(), np.concatenate([a, b], axis=1))
    assert store.d_in == 8 and store.n_rows == 30
    assert [(s["name"], s["d"]) for s in store.sources] == [("base", 3), ("chat", 5)]
    assert all(s[k] is None for s in store.sources for k in ("model", "hash", "layer", "site"))
    assert store.sources[0]["files"] == ["00.npy", "01.safetensors"]


def test_single_source_import_has_no_sources(tmp_path):
    np.save(tmp_path / "x.npy", randn(5, 4, 2))
    store = import_activations(tmp_path / "x.npy", tmp_path / "store")
    assert store.sources is None and "sources" not in store.meta


@pytest.mark.parametrize("second, names, error", [
    ((29, 5), None, r"different row counts \(a.npy: 30, b.npy: 29\)"),
    ((30, 5), ["x", "x"], r"source names must be unique"),
    ((30, 5), ["x"], r"--names gives 1 names for 2 sources"),
])
def test_bad_sources_are_refused_and_leave_nothing(tmp_path, second, names, error):
    np.save(tmp_path / "a.npy", randn(30, 3, 0))
    np.save(tmp_path / "b.npy", randn(*second, 1))
    with pytest.raises(UserError, match=error):
        import_activations([tmp_path / "a.npy", tmp_path / "b.npy"], tmp_path / "store",
                           names=names)
    assert not (tmp_path / "store").exists()


def test_inconsistent_sources_in_meta_are_refused(tmp_path):
    np.save(tmp_path / "a.npy", randn(6, 3, 0))
    np.save(tmp_path / "b.npy", randn(6, 3, 1))
    store = import_activations([tmp_path / "a.npy", tmp_path / "b.npy"], tmp_path / "store")
    meta = json.loads((tmp_path / "store/meta.json").read_text())
    meta["sources"][1]["d"] = 4
    (tmp_path / "store/meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"inconsistent: its sources \(a: 3, b: 4\) do not "
                                        r"split its row width 6"):
        _ = open_store(store.path).sources


def test_import_sources_through_the_entry_point(tmp_path):
    np.save(tmp_path / "a.npy", randn(20, 3, 0))
    np.save(tmp_path / "b.npy", randn(20, 2, 1))
    out = json_result(sae_jax_cli("import", tmp_path / "a.npy", tmp_path / "b.npy",
                                  tmp_path / "store", "--names", "base,chat"))
    assert out["d_in"] == 5 and [s["name"] for s in out["sources"]] == ["base", "chat"]
    np.save(tmp_path / "c.npy", randn(19, 2, 1))
    line = one_error_line(sae_jax_cli("import", tmp_path / "a.npy", tmp_path / "c.npy",
                                      tmp_path / "store2"))
    assert "different row counts (a.npy: 20, c.npy: 19)" in line
