"""The activation store: an (N, d_in) tensorstore array in row chunks, plus `meta.json`.

Layout of DATA_DIR (a local path or `gs://bucket/path`):

    rows/        zarr3 array (N, d_in), float32 or bfloat16, chunks of CHUNK_ROWS rows
    token_ids/   optional zarr3 int32 (N,): the token each row was read at
    positions/   optional zarr3 int32 (N, 2): (document index, token position) of each row
    meta.json    d_in, n_rows, dtype, chunk_rows, id, what produced the rows; written last

`meta.json` is the commit marker: a store without it is unfinished and is never opened.
Locally the writer works in a hidden temporary directory renamed into place at the end,
so an interrupted or failed write leaves nothing behind (`staging`).

Every chunk written carries a crc32c checksum that every read checks, and a missing chunk
is an error, never zeros: damaged data is refused with one line naming the chunk, not fed
on (`chunks`). Stores written before checksums existed still open and read, unchecked.
Every store has a unique `id` (None for older stores), so a run can refuse to resume on a
different store of the same shape.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

from sae_jax.data import chunks, staging
from sae_jax.errors import UserError
from sae_jax.files import CONTEXT, is_remote, kvstore_url, read_text, write_text

META_FILE = "meta.json"
ROWS, TOKEN_IDS, POSITIONS = "rows", "token_ids", "positions"
CHUNK_ROWS = 4096
STORE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _create_array(path: str, dtype, width: tuple[int, ...], chunk_rows: int, checksum: bool):
    metadata = {"shape": [0, *width], "data_type": np.dtype(dtype).name,
                "chunk_grid": {"name": "regular",
                               "configuration": {"chunk_shape": [chunk_rows, *width]}},
                "codecs": chunks.codecs(checksum)}
    # every chunk is stored, even one equal to the fill value: a missing chunk is damage
    return ts.open({"driver": "zarr3", "kvstore": kvstore_url(path), "metadata": metadata,
                    "store_data_equal_to_fill_value": True},
                   create=True, context=CONTEXT).result()


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
      chunk_rows: rows per chunk (the unit of I/O and of checksums).
      checksum: give every chunk a crc32c checksum (off only to measure what it costs).
    """

    def __init__(self, data_dir: str | os.PathLike, d_in: int, dtype: str = "float32",
                 meta: dict | None = None, with_tokens: bool = False,
                 chunk_rows: int = CHUNK_ROWS, checksum: bool = True):
        if dtype not in STORE_DTYPES:
            raise UserError(f"store dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype}")
        if not _positive_int(chunk_rows):
            raise UserError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        self.final = str(data_dir).rstrip("/")
        if read_text(f"{self.final}/{META_FILE}") is not None:
            raise UserError(f"{self.final} already holds a store; choose a new directory")
        self.d_in, self.dtype, self.with_tokens = d_in, dtype, with_tokens
        self.meta = dict(meta or {})
        self.chunk_rows, self.n_rows, self.checksum = chunk_rows, 0, checksum
        self.id = uuid.uuid4().hex
        if is_remote(self.final):
            self.path = self.final  # no rename on object stores: meta.json marks completion
        elif Path(self.final).exists() and (not Path(self.final).is_dir()
                                            or any(Path(self.final).iterdir())):
            raise UserError(f"{self.final} exists and is not an empty directory; choose a new "
                            "one for the store")
        else:
            final = Path(self.final)
            final.parent.mkdir(parents=True, exist_ok=True)
            removed = staging.remove_stale_temp_dirs(final.parent)
            if removed:
                print(f"sae-jax: removed {len(removed)} unfinished store(s) of processes that "
                      f"no longer run from {final.parent}: {', '.join(removed)}",
                      file=sys.stderr)
            self.path = staging.make_temp_dir(final)
        self.rows = self._create(ROWS, STORE_DTYPES[dtype], (d_in,))
        self.token_ids = self.positions = None
        if with_tokens:
            self.token_ids = self._create(TOKEN_IDS, np.int32, ())
            self.positions = self._create(POSITIONS, np.int32, (2,))

    def _create(self, name: str, dtype, width: tuple[int, ...]) -> ts.TensorStore:
        return _create_array(f"{self.path}/{name}", dtype, width, self.chunk_rows, self.checksum)

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
        layout = {"d_in": self.d_in, "n_rows": self.n_rows, "dtype": self.dtype,
                  "chunk_rows": self.chunk_rows, "id": self.id,
                  "checksum": chunks.CHECKSUM if self.checksum else None,
                  "token_ids": TOKEN_IDS if self.with_tokens else None,
                  "positions": POSITIONS if self.with_tokens else None}
        meta = {**layout, **{k: v for k, v in self.meta.items() if k not in layout}}
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
        return self.read_many([(i, j)])[0]

    def read_many(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """`read(i, j)` of every range, the reads running concurrently."""
        bounded = []
        for i, j in ranges:
            i = min(max(0, i), len(self))
            j = max(i, min(len(self), j))
            bounded.append((self.start + i, self.start + j))
        return self.store.read_many(ROWS, bounded)


@dataclass(frozen=True)
class Store:
    """An opened store. `rows` (and `token_ids`, `positions` if present) are tensorstores;
    `read` reads any of them, turning a damaged chunk into one `UserError` line."""

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
    def chunk_rows(self) -> int:
        return chunks.chunk_rows(self.rows)

    @property
    def id(self) -> str | None:
        """The store's unique id (a uuid4 hex), or None for a store older than ids."""
        return self.meta.get("id")

    @property
    def checksummed(self) -> bool:
        """Whether every chunk read is checked against its crc32c checksum."""
        return chunks.has_checksum(self.rows)

    @property
    def array_names(self) -> list[str]:
        return [name for name in (ROWS, TOKEN_IDS, POSITIONS) if getattr(self, name) is not None]

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Entries [start, stop) of array `name` (`ROWS`, `TOKEN_IDS` or `POSITIONS`).

        Raises:
          UserError: a chunk in the range is missing, truncated, fails its checksum or
            cannot be decoded; the message names the store, the chunk and its rows.
        """
        return self.read_many(name, [(start, stop)])[0]

    def read_many(self, name: str, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """`read(name, start, stop)` of every range, issued at once so that the chunks are
        read, checksummed and decoded concurrently."""
        array = getattr(self, name)
        if array is None:
            raise UserError(f"store {self.path} has no {name} (stores made by `sae-jax "
                            "harvest` have them; imported ones do not)")
        pending = [array[start:stop].read() for start, stop in ranges]
        done = []
        for (start, stop), read in zip(ranges, pending):
            try:
                done.append(read.result())
            except ValueError as e:
                raise UserError(self._read_failure(name, start, stop, e)) from None
        return done

    def _read_failure(self, name: str, start: int, stop: int, error: ValueError) -> str:
        """The message for a failed read: the first damaged chunk in the range if one is
        found, else the reader's own first line (e.g. a network error)."""
        array = getattr(self, name)
        size = chunks.chunk_rows(array)
        for k in range(start // size, -(-stop // size)):
            try:
                problem = chunks.chunk_problem(array, k)
            except ValueError:
                continue
            if problem:
                return (f"store {self.path} is damaged: {chunks.describe(array, name, k)} "
                        f"{problem}; `sae-jax check {self.path}` lists every damaged chunk")
        return (f"cannot read {name} {start}..{stop - 1} of store {self.path}: "
                f"{chunks.first_line(error)}")

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

    @property
    def sources(self) -> list[dict] | None:
        """The sources side by side in each row (`meta["sources"]`: each a dict with at
        least `name` and width `d`, plus `model`, `hash`, `layer`, `site`, None where
        unknown), in row order; None for a single-source store."""
        sources = self.meta.get("sources")
        if sources is None:
            return None
        try:
            widths = [int(s["d"]) for s in sources]
            names = [str(s["name"]) for s in sources]
        except (TypeError, KeyError, ValueError):
            raise UserError(f"store {self.path} is inconsistent: meta sources must be a list "
                            "of {name, d, ...} objects") from None
        if not widths or min(widths) <= 0 or sum(widths) != self.d_in or len(set(names)) < len(
                names):
            listed = ", ".join(f"{n}: {d}" for n, d in zip(names, widths))
            raise UserError(f"store {self.path} is inconsistent: its sources ({listed}) do not "
                            f"split its row width {self.d_in} into uniquely named parts")
        return list(sources)

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


def _open_array(path: str, name: str) -> ts.TensorStore:
    try:
        return ts.open({"driver": "zarr3", "kvstore": kvstore_url(f"{path}/{name}"),
                        "fill_missing_data_reads": False},  # a missing chunk is an error
                       open=True, read=True, context=CONTEXT).result()
    except ValueError as e:
        raise UserError(f"cannot open the {name} array of store {path}: "
                        f"{chunks.first_line(e)}") from None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _checked_meta(path: str, text: str) -> dict:
    """The parsed `meta.json`, its layout fields checked to be sensible values."""
    where = f"{path}/{META_FILE}"
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is damaged: JSONDecodeError: {e}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{where} is damaged: expected a JSON object")
    for key in ("d_in", "n_rows", "chunk_rows"):
        if key == "chunk_rows" and key not in meta:
            continue  # optional: the rows array's chunking is the truth
        if key not in meta:
            raise UserError(f"{where} is damaged: it has no {key!r}")
        if not _positive_int(meta[key]):
            raise UserError(f"{where} is damaged: {key} must be a positive integer, got "
                            f"{meta[key]!r}")
    if "dtype" in meta and meta["dtype"] not in STORE_DTYPES:
        raise UserError(f"{where} is damaged: dtype must be one of {', '.join(STORE_DTYPES)}, "
                        f"got {meta['dtype']!r}")
    if meta.get("id") is not None and not (isinstance(meta["id"], str) and meta["id"]):
        raise UserError(f"{where} is damaged: id must be a non-empty string, got "
                        f"{meta['id']!r}")
    return meta


def _check_array(path: str, name: str, array: ts.TensorStore, shape: tuple, chunk: int,
                 dtype: str) -> None:
    """Refuses an array whose shape, chunking or dtype disagree with `meta.json`."""
    said, found = None, None
    if tuple(array.shape) != shape:
        said, found = "x".join(map(str, shape)), "x".join(map(str, array.shape))
    elif chunks.chunk_rows(array) != chunk:
        said, found = f"chunks of {chunk} rows", f"chunks of {chunks.chunk_rows(array)} rows"
    elif array.dtype.numpy_dtype.name != dtype:
        said, found = dtype, array.dtype.numpy_dtype.name
    if said is not None:
        raise UserError(f"store {path} is inconsistent: {META_FILE} says {name} is {said}, "
                        f"the {name} array is {found}")


def open_store(data_dir: str | os.PathLike) -> Store:
    """Opens a committed store, checking `meta.json` against the arrays."""
    path = str(data_dir).rstrip("/")
    text = read_text(f"{path}/{META_FILE}")
    if text is None:
        raise UserError(f"no activation store at {path} (missing {META_FILE}); "
                        "create one with `sae-jax import` or `sae-jax harvest`")
    meta = _checked_meta(path, text)
    n_rows = meta["n_rows"]
    rows = _open_array(path, ROWS)
    chunk = meta.get("chunk_rows", chunks.chunk_rows(rows))
    dtype = meta.get("dtype", rows.dtype.numpy_dtype.name)
    _check_array(path, ROWS, rows, (n_rows, meta["d_in"]), chunk, dtype)
    arrays = {ROWS: rows}
    for name, width in ((TOKEN_IDS, ()), (POSITIONS, (2,))):
        if meta.get(name):
            arrays[name] = _open_array(path, name)
            _check_array(path, name, arrays[name], (n_rows, *width), chunk, "int32")
    return Store(path, meta, rows, arrays.get(TOKEN_IDS), arrays.get(POSITIONS))


def verify_store(data_dir: str | os.PathLike) -> list[str]:
    """One line per damaged thing in the store at `data_dir`; an empty list if it is intact.

    Checks `meta.json` against the arrays, then reads every chunk of every array (rows,
    token ids, positions) one at a time, so a store larger than memory can be checked:
    missing, truncated or extended chunk files, checksum mismatches, undecodable chunks.
    A store written before checksums is checked for everything but bit flips.
    """
    try:
        store = open_store(data_dir)
    except UserError as e:
        return [str(e)]
    problems = []
    for name in store.array_names:
        array = getattr(store, name)
        for k in range(chunks.chunk_count(array)):
            try:
                problem = chunks.chunk_problem(array, k)
            except ValueError as e:
                problem = f"cannot be read ({chunks.first_line(e)})"
            if problem:
                problems.append(f"{chunks.describe(array, name, k)} {problem}")
    return problems
