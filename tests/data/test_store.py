"""`sae_jax.data.store` (StoreWriter, open_store, split) and `sae_jax.data.importers`
(import_activations).

Every failure must be a `UserError` with a clear message, and a failed write must leave
nothing on disk: neither the store directory nor the writer's hidden temporary directory.
"""

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from sae_jax.data import importers
from sae_jax.data.importers import import_activations, open_source
from sae_jax.data.store import StoreWriter, open_store
from sae_jax.errors import UserError

BF16 = ml_dtypes.bfloat16


def randn(n: int, d: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def listing(folder) -> list[str]:
    """Everything in `folder`, hidden entries included."""
    return sorted(os.listdir(folder))


def write_store(path, rows: np.ndarray, **kwargs):
    w = StoreWriter(path, d_in=rows.shape[1], **kwargs)
    w.append(rows)
    return w.close()


# ---------------------------------------------------------------- StoreWriter


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_writer_chunked_appends_round_trip(tmp_path, dtype):
    x = randn(43, 5, seed=1)
    ids = (np.arange(43, dtype=np.int64) * 7919) % 30522  # int64 in, int32 on disk
    pos = np.stack([np.arange(43) // 10, np.arange(43) % 10], axis=1)
    w = StoreWriter(tmp_path / "store", d_in=5, dtype=dtype, chunk_rows=8, with_tokens=True,
                    meta={"model": "toy", "layer": 3, "corpus": ["a", "b"]})
    bounds = [0, 13, 33, 34, 43]  # appends of 13, 20, 1, 9 rows over chunks of 8
    for a, b in zip(bounds, bounds[1:]):
        w.append(x[a:b], token_ids=ids[a:b], positions=pos[a:b])
    assert w.n_rows == 43
    store = w.close()

    want_dtype = np.dtype(np.float32 if dtype == "float32" else BF16)
    got = store.rows.read().result()
    assert got.dtype == want_dtype and got.shape == (43, 5)
    np.testing.assert_array_equal(got, x.astype(want_dtype))
    if dtype == "bfloat16":  # the rounding really happened (values are not float32-exact)
        assert not np.array_equal(got.astype(np.float32), x)
        np.testing.assert_allclose(got.astype(np.float32), x, rtol=2 ** -8)
    assert list(store.rows.chunk_layout.write_chunk.shape) == [8, 5]

    tok = store.token_ids.read().result()
    assert tok.dtype == np.int32
    np.testing.assert_array_equal(tok, ids)
    positions = store.positions.read().result()
    assert positions.dtype == np.int32 and positions.shape == (43, 2)
    np.testing.assert_array_equal(positions, pos)

    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert len(meta["id"]) == 32 and int(meta["id"], 16) >= 0  # a uuid4 hex
    assert meta == {"d_in": 5, "n_rows": 43, "dtype": dtype, "chunk_rows": 8,
                    "id": meta["id"], "checksum": "crc32c",
                    "token_ids": "token_ids", "positions": "positions",
                    "model": "toy", "layer": 3, "corpus": ["a", "b"]}
    assert store.meta == meta and store.d_in == 5 and store.n_rows == 43
    assert listing(tmp_path) == ["store"]  # the temporary directory was renamed into place

    reopened = open_store(str(tmp_path / "store") + "/")
    np.testing.assert_array_equal(reopened.rows.read().result(), got)
    np.testing.assert_array_equal(reopened.token_ids.read().result(), ids)


def test_writer_without_tokens(tmp_path):
    x = randn(10, 3)
    with StoreWriter(tmp_path / "store", d_in=3, chunk_rows=4) as w:
        w.append(x[:6])
        with pytest.raises(UserError, match="token_ids and positions must be given"):
            w.append(x[6:], token_ids=np.zeros(4), positions=np.zeros((4, 2)))
        w.append(x[6:])
    store = open_store(tmp_path / "store")
    assert store.token_ids is None and store.positions is None
    assert store.meta["token_ids"] is None and store.meta["positions"] is None
    np.testing.assert_array_equal(store.rows.read().result(), x)


def test_writer_with_tokens_requires_them_on_every_append(tmp_path):
    with StoreWriter(tmp_path / "store", d_in=3, with_tokens=True) as w:
        with pytest.raises(UserError, match="token_ids and positions must be given"):
            w.append(randn(2, 3))
        with pytest.raises(UserError, match="token_ids and positions must be given"):
            w.append(randn(2, 3), token_ids=np.zeros(2))
        w.append(randn(2, 3), token_ids=np.zeros(2), positions=np.zeros((2, 2)))
    assert open_store(tmp_path / "store").n_rows == 2


def test_split_holds_out_the_tail(tmp_path):
    x = np.arange(103, dtype=np.float32)[:, None].repeat(2, 1)
    store = write_store(tmp_path / "store", x, chunk_rows=16)
    train, held = store.split(0.1)  # round(10.3) = 10 held out
    assert (len(train), len(held)) == (93, 10)
    assert (train.start, train.stop, held.start, held.stop) == (0, 93, 93, 103)
    assert train.d_in == held.d_in == 2
    np.testing.assert_array_equal(train.read(0, 93), x[:93])
    np.testing.assert_array_equal(held.read(0, 10**6), x[93:])  # clamped to the span
    np.testing.assert_array_equal(held.read(-5, 3), x[93:96])
    np.testing.assert_array_equal(train.read(90, 200), x[90:93])  # never leaks the tail
    assert len(store.span()) == 103

    train, held = store.split(0.05)  # round(5.15) = 5
    assert (len(train), len(held)) == (98, 5)
    train, held = store.split(1e-9)  # at least one held-out row
    assert (len(train), len(held)) == (102, 1)
    with pytest.raises(UserError, match="103 rows: too few to hold out"):
        store.split(0.999)


def test_rowspan_read_past_end_is_empty_like_arrayspan(tmp_path):
    from sae_jax.data.loader import ArraySpan

    x = randn(10, 3)
    train, _ = write_store(tmp_path / "store", x).split(0.2)
    assert ArraySpan(x[:8]).read(9, 12).shape == (0, 3)
    assert train.read(9, 12).shape == (0, 3)


def test_exception_inside_with_leaves_nothing(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(parent / "store", d_in=3, chunk_rows=4, with_tokens=True) as w:
            w.append(randn(9, 3), token_ids=np.arange(9), positions=np.zeros((9, 2)))
            hidden = [p for p in listing(parent) if p.startswith(".store.")]
            assert len(hidden) == 1 and not (parent / "store").exists()  # written aside
            assert os.listdir(parent / hidden[0])  # and something really was written
            raise RuntimeError("boom")
    assert listing(parent) == []


def test_user_error_inside_with_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match=r"rows must have shape \(n, 3\), got \(2, 4\)"):
        with StoreWriter(tmp_path / "store", d_in=3) as w:
            w.append(randn(5, 3))
            w.append(randn(2, 4))
    assert listing(tmp_path) == []


def test_close_without_rows_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match="no rows were written to"):
        with StoreWriter(tmp_path / "store", d_in=3):
            pass
    assert listing(tmp_path) == []


def test_empty_existing_directory_is_replaced(tmp_path):
    (tmp_path / "store").mkdir()
    store = write_store(tmp_path / "store", randn(4, 3))
    assert store.n_rows == 4 and listing(tmp_path) == ["store"]


def test_second_writer_on_existing_store_is_refused(tmp_path):
    x = randn(6, 3)
    write_store(tmp_path / "store", x)
    with pytest.raises(UserError, match="already holds a store; choose a new directory"):
        StoreWriter(tmp_path / "store", d_in=3)
    assert listing(tmp_path) == ["store"]  # no temporary directory was made
    np.testing.assert_array_equal(open_store(tmp_path / "store").rows.read().result(), x)


def test_writer_into_nonempty_non_store_directory(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    with pytest.raises(UserError):
        write_store(tmp_path / "store", randn(4, 3))
    assert listing(tmp_path) == ["store"]
    assert listing(tmp_path / "store") == ["notes.txt"]


def test_wrong_width_and_rank_appends_are_refused(tmp_path):
    x = randn(3, 3)
    with StoreWriter(tmp_path / "store", d_in=3) as w:
        w.append(x[:2])
        with pytest.raises(UserError, match=r"rows must have shape \(n, 3\), got \(4, 4\)"):
            w.append(randn(4, 4))
        with pytest.raises(UserError, match=r"rows must have shape \(n, 3\), got \(3,\)"):
            w.append(np.zeros(3))
        with pytest.raises(UserError, match=r"got \(1, 1, 3\)"):
            w.append(np.zeros((1, 1, 3)))
        w.append(x[2:])
    store = open_store(tmp_path / "store")
    assert store.n_rows == 3  # the refused appends wrote nothing
    np.testing.assert_array_equal(store.rows.read().result(), x)


def test_unknown_store_dtype_is_refused(tmp_path):
    with pytest.raises(UserError, match="store dtype must be one of float32, bfloat16, got "
                                        "float16"):
        StoreWriter(tmp_path / "store", d_in=3, dtype="float16")
    assert listing(tmp_path) == []


# ---------------------------------------------------------------- open_store


def test_open_without_meta_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"no activation store at .*nowhere \(missing meta.json\)"):
        open_store(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"missing meta.json.*sae-jax import"):
        open_store(tmp_path / "empty")


def test_unfinished_store_is_never_opened(tmp_path):
    with StoreWriter(tmp_path / "store", d_in=3) as w:
        w.append(randn(4, 3))
        (hidden,) = [p for p in listing(tmp_path) if p.startswith(".store.")]
        with pytest.raises(UserError, match="missing meta.json"):
            open_store(tmp_path / hidden)
    assert open_store(tmp_path / "store").n_rows == 4


@pytest.mark.parametrize("text, error", [
    ("{not json", "JSONDecodeError"),
    ('{"n_rows": 6}', "it has no 'd_in'"),
    ('{"d_in": 3}', "it has no 'n_rows'"),
    ("[3, 6]", "expected a JSON object"),
    ('{"d_in": "three", "n_rows": 6}', "d_in must be a positive integer, got 'three'"),
    ("", "JSONDecodeError"),
])
def test_damaged_meta_is_refused(tmp_path, text, error):
    write_store(tmp_path / "store", randn(6, 3))
    (tmp_path / "store" / "meta.json").write_text(text)
    with pytest.raises(UserError, match=rf"store/meta.json is damaged: {error}"):
        open_store(tmp_path / "store")


@pytest.mark.parametrize("key, value, says", [("n_rows", 7, "rows is 7x3"),
                                              ("d_in", 4, "rows is 6x4")])
def test_meta_disagreeing_with_array_is_refused(tmp_path, key, value, says):
    write_store(tmp_path / "store", randn(6, 3))
    meta_path = tmp_path / "store" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta[key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"is inconsistent: meta.json says {says}, the rows "
                                        r"array is 6x3"):
        open_store(tmp_path / "store")


def test_missing_rows_array_is_refused(tmp_path):
    write_store(tmp_path / "store", randn(6, 3))
    for f in sorted((tmp_path / "store" / "rows").rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    (tmp_path / "store" / "rows").rmdir()
    with pytest.raises(UserError, match="cannot open the rows array of"):
        open_store(tmp_path / "store")


# ---------------------------------------------------------------- import_activations


@pytest.fixture
def dirs(tmp_path):
    """(src folder, out folder): the store goes to out/store; out must stay empty on error."""
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "src", tmp_path / "out"


@pytest.mark.parametrize("src_dtype, stored", [
    (np.float32, "float32"), (np.float64, "float32"), (np.float16, "float32"),
    (BF16, "bfloat16"),
])
def test_import_npy_dtypes(dirs, src_dtype, stored):
    src, out = dirs
    x = (randn(37, 6, seed=2, dtype=np.float64) * 3).astype(src_dtype)
    np.save(src / "acts.npy", x)
    store = import_activations(src / "acts.npy", out / "store")
    got = store.rows.read().result()
    assert store.meta["dtype"] == stored and store.n_rows == 37 and store.d_in == 6
    assert got.dtype == np.dtype(np.float32 if stored == "float32" else BF16)
    np.testing.assert_array_equal(got, x.astype(got.dtype))
    if src_dtype == np.float64:  # really converted, not just re-labelled
        assert not np.array_equal(got.astype(np.float64), x)
    assert store.meta["source"] == str((src / "acts.npy").absolute())
    assert store.meta["files"] == ["acts.npy"] and store.meta["tensor"] is None
    assert listing(out) == ["store"]


def test_import_safetensors_single_tensor(dirs):
    src, out = dirs
    x = randn(20, 4, seed=3)
    save_file({"activations": x}, str(src / "a.safetensors"), metadata={"layer": "3"})
    store = import_activations(src / "a.safetensors", out / "store")
    np.testing.assert_array_equal(store.rows.read().result(), x)
    assert store.meta["dtype"] == "float32" and store.meta["tensor"] is None


@pytest.mark.parametrize("src_dtype, stored", [(np.float16, "float32"), (BF16, "bfloat16")])
def test_import_safetensors_half_dtypes(dirs, src_dtype, stored):
    src, out = dirs
    x = randn(9, 4, seed=4).astype(src_dtype)
    save_file({"x": x}, str(src / "a.safetensors"))
    store = import_activations(src / "a.safetensors", out / "store")
    got = store.rows.read().result()
    assert store.meta["dtype"] == stored
    np.testing.assert_array_equal(got.astype(np.float32), x.astype(np.float32))


def test_import_safetensors_named_tensor(dirs):
    src, out = dirs
    a, b = randn(8, 4, seed=5), randn(11, 6, seed=6)
    save_file({"a": a, "b": b}, str(src / "two.safetensors"))
    store = import_activations(src / "two.safetensors", out / "store", tensor="b")
    assert store.d_in == 6 and store.meta["tensor"] == "b"
    np.testing.assert_array_equal(store.rows.read().result(), b)


def test_import_safetensors_several_without_a_name(dirs):
    src, out = dirs
    save_file({"b": randn(3, 4), "a": randn(3, 4)}, str(src / "two.safetensors"))
    with pytest.raises(UserError, match=r"two.safetensors holds 2 tensors \(a, b\); choose one "
                                        r"with --tensor NAME"):
        import_activations(src / "two.safetensors", out / "store")
    assert listing(out) == []


def test_import_safetensors_missing_name(dirs):
    src, out = dirs
    save_file({"b": randn(3, 4), "a": randn(3, 4)}, str(src / "two.safetensors"))
    with pytest.raises(UserError, match=r"has no tensor 'c'; it has: a, b"):
        import_activations(src / "two.safetensors", out / "store", tensor="c")
    assert listing(out) == []


def test_import_folder_concatenates_in_name_order(dirs):
    src, out = dirs
    x = randn(30, 5, seed=7)
    # written out of name order; a non-activation file is ignored
    save_file({"t": x[7:19]}, str(src / "02.safetensors"))
    np.save(src / "10.npy", x[19:])
    np.save(src / "01.npy", x[:7])
    (src / "README.txt").write_text("not activations")
    store = import_activations(src, out / "store")
    assert store.meta["files"] == ["01.npy", "02.safetensors", "10.npy"]
    np.testing.assert_array_equal(store.rows.read().result(), x)


def test_import_folder_of_mixed_precisions_is_float32(dirs):
    src, out = dirs
    a, b = randn(4, 3, seed=8).astype(BF16), randn(5, 3, seed=9)
    np.save(src / "a.npy", a)
    np.save(src / "b.npy", b)
    store = import_activations(src, out / "store")
    assert store.meta["dtype"] == "float32"
    np.testing.assert_array_equal(store.rows.read().result(),
                                  np.concatenate([a.astype(np.float32), b]))


def test_import_folder_with_mismatched_widths(dirs):
    src, out = dirs
    np.save(src / "a.npy", randn(5, 4))
    save_file({"t": randn(5, 6)}, str(src / "b.safetensors"))
    np.save(src / "c.npy", randn(5, 4))
    with pytest.raises(UserError, match=r"files have different widths \(a.npy: 4, "
                                        r"b.safetensors: 6, c.npy: 4\)"):
        import_activations(src, out / "store")
    assert listing(out) == []


def _garbage_npy(src):
    (src / "g.npy").write_bytes(b"this is not an array, just some text\n" * 4)
    return src / "g.npy"


def _truncated_npy(src):
    np.save(src / "t.npy", randn(50, 4))
    data = (src / "t.npy").read_bytes()
    (src / "t.npy").write_bytes(data[:len(data) // 2])
    return src / "t.npy"


def _bad_header_safetensors(src):
    header = b"{this is not json}"
    (src / "h.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return src / "h.safetensors"


def _truncated_safetensors(src):
    save_file({"t": randn(50, 4)}, str(src / "t.safetensors"))
    data = (src / "t.safetensors").read_bytes()
    (src / "t.safetensors").write_bytes(data[:-100])
    return src / "t.safetensors"


def _inconsistent_safetensors(src):
    """A header whose byte range disagrees with the tensor's shape (4x3 float32 = 48 bytes)."""
    header = json.dumps({"t": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 40]}})
    header = header.encode()
    (src / "d.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 40)
    return src / "d.safetensors"


def _npy(name, array):
    def make(src):
        np.save(src / name, array)
        return src / name
    return make


def _safetensors(name, array):
    def make(src):
        save_file({"t": array}, str(src / name))
        return src / name
    return make


def _txt(src):
    (src / "acts.txt").write_text("1 2 3\n")
    return src / "acts.txt"


def _empty_folder(src):
    (src / "empty").mkdir()
    (src / "empty" / "notes.md").write_text("nothing here")
    return src / "empty"


BAD_INPUTS = {
    "int32": (_npy("i.npy", np.arange(12, dtype=np.int32).reshape(4, 3)),
              r"i.npy: activations must be floating point, got dtype int32"),
    "bool": (_npy("b.npy", np.ones((4, 3), bool)), r"must be floating point, got dtype bool"),
    "int64-safetensors": (_safetensors("i.safetensors", np.ones((4, 3), np.int64)),
                          r"must be floating point, got dtype int64"),
    "1-D": (_npy("v.npy", np.ones(5, np.float32)),
            r"v.npy: expected a 2-D \(rows, d_in\) array, got shape \(5,\)"),
    "3-D": (_npy("c.npy", np.ones((2, 3, 4), np.float32)),
            r"expected a 2-D \(rows, d_in\) array, got shape \(2, 3, 4\)"),
    "no-rows": (_npy("e.npy", np.zeros((0, 4), np.float32)),
                r"e.npy: array is empty \(shape \(0, 4\)\)"),
    "no-columns": (_npy("e.npy", np.zeros((4, 0), np.float32)), r"array is empty"),
    "empty-safetensors": (_safetensors("e.safetensors", np.zeros((0, 4), np.float32)),
                          r"array is empty \(shape \(0, 4\)\)"),
    "garbage-npy": (_garbage_npy, r"cannot read .*g.npy as a .npy array"),
    "truncated-npy": (_truncated_npy, r"cannot read .*t.npy as a .npy array"),
    "bad-header-safetensors": (_bad_header_safetensors, r"cannot read .*h.safetensors as "
                                                        r"\.safetensors"),
    "inconsistent-safetensors": (_inconsistent_safetensors,
                                 r"tensor 't' is truncated or damaged"),
    "wrong-suffix": (_txt, r"acts.txt: expected a .npy or .safetensors file"),
    "empty-folder": (_empty_folder, r"empty holds no .npy or .safetensors files"),
    "missing": (lambda src: src / "nope.npy", r"no such file or folder: .*nope.npy"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_import_bad_input_is_a_user_error_and_leaves_nothing(dirs, case):
    src, out = dirs
    make, message = BAD_INPUTS[case]
    path = make(src)
    with pytest.raises(UserError, match=message):
        import_activations(path, out / "store")
    assert listing(out) == []


@pytest.mark.parametrize("content", [b"this is not a safetensors file\n" * 3,
                                     b"\xff" * 8 + b"{}"], ids=["text", "huge-length"])
def test_import_garbage_safetensors_is_a_user_error(dirs, content):
    src, out = dirs
    (src / "g.safetensors").write_bytes(content)
    with pytest.raises(UserError, match=r"cannot read .*g.safetensors as \.safetensors"):
        import_activations(src / "g.safetensors", out / "store")
    assert listing(out) == []


def test_import_truncated_safetensors_is_a_user_error(dirs):
    src, out = dirs
    path = _truncated_safetensors(src)
    with pytest.raises(UserError, match=r"t.safetensors.*truncated or damaged"):
        import_activations(path, out / "store")
    assert listing(out) == []


def test_import_non_finite_rows_are_counted_and_refused(dirs):
    src, out = dirs
    x = randn(20, 4)
    x[3, 0] = np.nan
    x[3, 2] = np.inf  # one bad row, even with two bad values
    x[7, 1] = -np.inf
    x[19, 3] = np.nan
    np.save(src / "x.npy", x)
    with pytest.raises(UserError, match=r"x.npy: 3 of 20 rows contain NaN or Inf"):
        import_activations(src / "x.npy", out / "store")
    assert listing(out) == []


def test_import_non_finite_rows_are_counted_over_all_files(dirs, monkeypatch):
    monkeypatch.setattr(importers, "CHUNK_ROWS", 4)
    src, out = dirs
    a, b = randn(10, 3, seed=1), randn(13, 3, seed=2).astype(BF16)
    a[0, 0] = np.nan
    b[[3, 4, 12], 1] = np.inf  # either side of a chunk boundary, and a 1-row last chunk
    np.save(src / "a.npy", a)
    np.save(src / "b.npy", b)
    with pytest.raises(UserError, match=r"src: 4 of 23 rows contain NaN or Inf"):
        import_activations(src, out / "store")
    assert listing(out) == []


def test_import_streams_in_chunks(dirs, monkeypatch):
    """Files are memory-mapped and copied CHUNK_ROWS rows at a time (a chunk may span two
    files: a folder's files are one sequence of rows); the result is exact."""
    src, out = dirs
    monkeypatch.setattr(importers, "CHUNK_ROWS", 7)
    appended = []
    real_append = StoreWriter.append

    def spy(self, rows, *args, **kwargs):
        appended.append(len(rows))
        return real_append(self, rows, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "append", spy)
    x = randn(73, 5, seed=11)
    np.save(src / "a.npy", x[:50])
    save_file({"t": x[50:]}, str(src / "b.safetensors"))
    assert isinstance(open_source(src / "a.npy"), np.memmap)  # never loaded whole
    assert isinstance(open_source(src / "b.safetensors"), np.memmap)
    store = import_activations(src, out / "store")
    assert appended == [7] * 10 + [3]
    np.testing.assert_array_equal(store.rows.read().result(), x)
    assert store.n_rows == 73


def test_import_non_finite_detected_across_chunk_boundaries(dirs, monkeypatch):
    src, out = dirs
    monkeypatch.setattr(importers, "CHUNK_ROWS", 5)
    x = randn(23, 2)
    x[[4, 5, 22], 0] = np.nan  # last row of chunk 0, first of chunk 1, and the final row
    np.save(src / "x.npy", x)
    with pytest.raises(UserError, match=r"3 of 23 rows contain NaN or Inf"):
        import_activations(src / "x.npy", out / "store")
    assert listing(out) == []


def test_import_into_existing_store_is_refused(dirs):
    src, out = dirs
    np.save(src / "x.npy", randn(5, 3))
    first = import_activations(src / "x.npy", out / "store")
    with pytest.raises(UserError, match="already holds a store"):
        import_activations(src / "x.npy", out / "store")
    assert listing(out) == ["store"]
    assert open_store(out / "store").meta == first.meta


def test_synthetic_store_fixture(synthetic_store, synthetic):
    store = open_store(synthetic_store)
    assert store.meta["chunk_rows"] == 4096 and store.meta["dtype"] == "float32"
    np.testing.assert_array_equal(store.rows.read().result(), synthetic[0])
    assert Path(synthetic_store).name == "store"
