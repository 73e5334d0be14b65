"""The activation store: an (N, d_in) tensorstore array in row chunks, plus `meta.json`.

Layout of DATA_DIR (a local path or `gs://bucket/path`):

    rows/        zarr3 array (N, d_in), float32 or bfloat16, chunks of CHUNK_ROWS rows
    token_ids/   optional zarr3 int32 (N,): the token each row was read at
    positions/   optional zarr3 int32 (N, 2): (document index, token position) of each row
    meta.json    d_in, n_rows, dtype, chunk_rows, what produced the rows; written last

`meta.json` is the commit marker: a store without it is unfinished and is never opened.
Locally the writer works in a hidden temporary directory renamed into place at the end,
so an interrupted or failed write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

from sae_jax.errors import UserError
from sae_jax.files import CONTEXT, is_remote, kvstore_url, read_text, write_text

META_FILE = "meta.json"
ROWS, TOKEN_IDS, POSITIONS = "rows", "token_ids", "positions"
CHUNK_ROWS = 4096
STORE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _create_array(path: str, dtype, width: tuple[int, ...], chunk_rows: int):
    return ts.open({"driver": "zarr3", "kvstore": kvstore_url(path)}, create=True,
                   context=CONTEXT,
                   dtype=ts.dtype(np.dtype(dtype).name), shape=[0, *width],
                   chunk_layout=ts.ChunkLayout(chunk_shape=[chunk_rows, *width])).result()


class StoreWriter:
    """Appends activation rows (and optional token metadata) to a new store, chunk by chunk.

    Use as a context manager: on success `close()` commits (writes `meta.json`, renames the
    temporary directory into place); on an exception everything written is removed.

        with StoreWriter(data_dir, d_in=384, meta={"model": "minilm"}) as w:
            w.append(rows, token_ids=ids, positions=doc_pos)

    Args:
      data_dir: the new store; must not already hold one.
      d_in: row width.
      dtype: "float32" or "bfloat16" on disk.
      meta: extra provenance for meta.json (model, layer, corpus, ...).
      with_tokens: whether every `append` carries `token_ids` and `positions`.
    """

    def __init__(self, data_dir: str | os.PathLike, d_in: int, dtype: str = "float32",
                 meta: dict | None = None, with_tokens: bool = False,
                 chunk_rows: int = CHUNK_ROWS):
        if dtype not in STORE_DTYPES:
            raise UserError(f"store dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype}")
        self.final = str(data_dir).rstrip("/")
        if read_text(f"{self.final}/{META_FILE}") is not None:
            raise UserError(f"{self.final} already holds a store; choose a new directory")
        self.d_in, self.dtype, self.with_tokens = d_in, dtype, with_tokens
        self.meta = dict(meta or {})
        self.chunk_rows, self.n_rows = chunk_rows, 0
        if is_remote(self.final):
            self.path = self.final  # no rename on object stores: meta.json marks completion
        elif Path(self.final).exists() and (not Path(self.final).is_dir()
                                            or any(Path(self.final).iterdir())):
            raise UserError(f"{self.final} exists and is not an empty directory; choose a new "
                            "one for the store")
        else:
            Path(self.final).parent.mkdir(parents=True, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix=f".{Path(self.final).name}.",
                                         dir=Path(self.final).parent)
        self.rows = _create_array(f"{self.path}/{ROWS}", STORE_DTYPES[dtype], (d_in,), chunk_rows)
        self.token_ids = self.positions = None
        if with_tokens:
            self.token_ids = _create_array(f"{self.path}/{TOKEN_IDS}", np.int32, (), chunk_rows)
            self.positions = _create_array(f"{self.path}/{POSITIONS}", np.int32, (2,),
                                           chunk_rows)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, rows: np.ndarray, token_ids: np.ndarray | None = None,
               positions: np.ndarray | None = None) -> None:
        """Appends rows (n, d_in); with `with_tokens`, also token ids (n,) and (doc, pos) (n, 2)."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.d_in:
            raise UserError(f"rows must have shape (n, {self.d_in}), got {rows.shape}")
        if (token_ids is not None) != self.with_tokens or (positions is None) == self.with_tokens:
            raise UserError("token_ids and positions must be given with every append "
                            "exactly when the writer was opened with_tokens=True")
        start, stop = self.n_rows, self.n_rows + len(rows)
        arrays = [self.rows]
        values = [rows.astype(STORE_DTYPES[self.dtype])]
        if self.with_tokens:
            arrays += [self.token_ids, self.positions]
            values += [np.asarray(token_ids, np.int32).reshape(len(rows)),
                       np.asarray(positions, np.int32).reshape(len(rows), 2)]
        grown = []
        for array, value in zip(arrays, values):
            array = array.resize(exclusive_max=[stop, *array.shape[1:]]).result()
            array[start:stop].write(value).result()
            grown.append(array)  # resize returns a handle with the new shape
        self.rows = grown[0]
        if self.with_tokens:
            self.token_ids, self.positions = grown[1:]
        self.n_rows = stop

    def close(self) -> Store:
        """Commits the store and returns it opened."""
        if self.n_rows == 0:
            self.abort()
            raise UserError(f"no rows were written to {self.final}")
        meta = {"d_in": self.d_in, "n_rows": self.n_rows, "dtype": self.dtype,
                "chunk_rows": self.chunk_rows, "token_ids": TOKEN_IDS if self.with_tokens else None,
                "positions": POSITIONS if self.with_tokens else None, **self.meta}
        write_text(f"{self.path}/{META_FILE}", json.dumps(meta, indent=2) + "\n")
        if self.path != self.final:
            try:
                if Path(self.final).exists():
                    Path(self.final).rmdir()  # empty (checked at start): fine to replace
                os.replace(self.path, self.final)
            except OSError as e:
                self.abort()
                raise UserError(f"cannot move the finished store into {self.final}: {e}") from None
        return open_store(self.final)

    def abort(self) -> None:
        """Removes everything written (best effort on object stores)."""
        if self.path != self.final:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for name in (ROWS, TOKEN_IDS, POSITIONS):
                ts.KvStore.open(kvstore_url(f"{self.path}/{name}"), context=CONTEXT).result(
                ).delete_range(
                    ts.KvStore.KeyRange()).result()


@dataclass(frozen=True)
class RowSpan:
    """A contiguous range of a store's rows, read in blocks (never all at once)."""

    store: Store
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def d_in(self) -> int:
        return self.store.d_in

    def read(self, i: int, j: int) -> np.ndarray:
        """Rows [i, j) of this span as a numpy array in the store's dtype."""
        i = min(max(0, i), len(self))
        j = max(i, min(len(self), j))
        return self.store.rows[self.start + i:self.start + j].read().result()


@dataclass(frozen=True)
class Store:
    """An opened store. `rows` (and `token_ids`, `positions` if present) are tensorstores."""

    path: str
    meta: dict
    rows: ts.TensorStore
    token_ids: ts.TensorStore | None
    positions: ts.TensorStore | None

    @property
    def d_in(self) -> int:
        return int(self.meta["d_in"])

    @property
    def n_rows(self) -> int:
        return int(self.meta["n_rows"])

    @property
    def pair(self) -> tuple[int, int] | None:
        """`(d_in, d_out)` when each row is a transcoder's input followed by its target
        (`meta["pair"]`, written by `sae-jax harvest --pair`); None for plain rows."""
        pair = self.meta.get("pair")
        if pair is None:
            return None
        d_in, d_out = int(pair["d_in"]), int(pair["d_out"])
        if d_in + d_out != self.d_in:
            raise UserError(f"store {self.path} is inconsistent: its pair widths {d_in} + "
                            f"{d_out} do not add up to its row width {self.d_in}")
        return d_in, d_out

    def span(self) -> RowSpan:
        return RowSpan(self, 0, self.n_rows)

    def split(self, holdout: float) -> tuple[RowSpan, RowSpan]:
        """(train rows, held-out rows): the held-out rows are the store's tail.

        The tail holds the last documents harvested, so no document is in both halves.
        """
        n_eval = max(1, int(round(holdout * self.n_rows)))
        if n_eval >= self.n_rows:
            raise UserError(f"store {self.path} has {self.n_rows} rows: too few to hold out "
                            f"{holdout:.0%} for eval and still train")
        return RowSpan(self, 0, self.n_rows - n_eval), RowSpan(self, self.n_rows - n_eval,
                                                               self.n_rows)


def _open_array(path: str, what: str) -> ts.TensorStore:
    try:
        return ts.open({"driver": "zarr3", "kvstore": kvstore_url(path)}, open=True,
                       read=True, context=CONTEXT).result()
    except ValueError as e:
        raise UserError(f"cannot open the {what} array of {path.rsplit('/', 1)[0]}: "
                        f"{str(e).splitlines()[0]}") from None


def open_store(data_dir: str | os.PathLike) -> Store:
    """Opens a committed store, checking `meta.json` against the arrays."""
    path = str(data_dir).rstrip("/")
    text = read_text(f"{path}/{META_FILE}")
    if text is None:
        raise UserError(f"no activation store at {path} (missing {META_FILE}); "
                        "create one with `sae-jax import` or `sae-jax harvest`")
    try:
        meta = json.loads(text)
        d_in, n_rows = int(meta["d_in"]), int(meta["n_rows"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}/{META_FILE} is damaged: {type(e).__name__}: {e}") from None
    rows = _open_array(f"{path}/{ROWS}", "rows")
    if tuple(rows.shape) != (n_rows, d_in):
        raise UserError(f"store {path} is inconsistent: {META_FILE} says {n_rows}x{d_in}, "
                        f"the rows array is {tuple(rows.shape)}")
    token_ids = _open_array(f"{path}/{TOKEN_IDS}", "token_ids") if meta.get("token_ids") else None
    positions = _open_array(f"{path}/{POSITIONS}", "positions") if meta.get("positions") else None
    return Store(path, meta, rows, token_ids, positions)
