"""One chunk of a store array on disk: how it is encoded, and what is wrong with it if it
cannot be read.

A store array (`rows/`, `token_ids/`, `positions/`) is a zarr3 array cut into row chunks,
one file (object) each. New arrays append a crc32c checksum to every chunk, which
tensorstore checks on every read; arrays written before checksums existed have none.
Either way every chunk has a fixed byte size (the last chunk is stored whole too), so a
truncated or extended chunk is found by its size alone.
"""

from __future__ import annotations

import math

import tensorstore as ts

CHECKSUM = "crc32c"
CHECKSUM_BYTES = 4


def codecs(checksum: bool) -> list[dict]:
    """The zarr3 codec chain of a new array: raw little-endian bytes, then the checksum."""
    chain = [{"name": "bytes", "configuration": {"endian": "little"}}]
    return chain + [{"name": CHECKSUM}] if checksum else chain


def has_checksum(array: ts.TensorStore) -> bool:
    return any(c.get("name") == CHECKSUM for c in array.codec.to_json().get("codecs", []))


def chunk_rows(array: ts.TensorStore) -> int:
    return int(array.chunk_layout.read_chunk.shape[0])


def chunk_count(array: ts.TensorStore) -> int:
    return -(-int(array.shape[0]) // chunk_rows(array))


def chunk_key(array: ts.TensorStore, k: int) -> str:
    """The key of row chunk `k` under zarr3's default key encoding (`c/k/0/...`)."""
    return "/".join(["c", str(k)] + ["0"] * (array.rank - 1))


def describe(array: ts.TensorStore, name: str, k: int) -> str:
    """`rows/c/3/0 (rows 12288..16383)`: a chunk's file under the store, and its rows."""
    size = chunk_rows(array)
    last = min((k + 1) * size, int(array.shape[0])) - 1
    return f"{name}/{chunk_key(array, k)} (rows {k * size}..{last})"


def chunk_bytes(array: ts.TensorStore) -> int:
    """The size every chunk file of `array` must have."""
    size = math.prod(array.chunk_layout.read_chunk.shape) * array.dtype.numpy_dtype.itemsize
    return size + (CHECKSUM_BYTES if has_checksum(array) else 0)


def chunk_problem(array: ts.TensorStore, k: int) -> str | None:
    """What is wrong with row chunk `k` of `array` ("is missing", "is truncated ...", "fails
    its crc32c checksum", ...), or None if it reads back intact. Reads the chunk."""
    value = array.kvstore.read(chunk_key(array, k)).result()
    if value.state != "value":
        return "is missing"
    size, want = len(value.value), chunk_bytes(array)
    if size < want:
        return f"is truncated ({size} of {want} bytes)"
    if size > want:
        return f"has {size - want} bytes more than the {want} it should have"
    rows = chunk_rows(array)
    try:
        array[k * rows:min((k + 1) * rows, array.shape[0])].read().result()
    except ValueError as e:
        if "Digest mismatch" in str(e):
            return f"fails its {CHECKSUM} checksum (its bytes changed since it was written)"
        return f"cannot be decoded ({first_line(e)})"
    return None


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
