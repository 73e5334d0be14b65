"""Reading `.safetensors` without a framework: a u64 header length, a JSON header
`{name: {dtype, shape, data_offsets}}`, then raw little-endian C-order bytes.

Tensors are memory-mapped, so a multi-GB file is never read whole; every field of the
header is checked against the file so a damaged or truncated file is a one-line error.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from sae_jax.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """`({name: {"dtype", "shape", "data_offsets"}}, offset of the data)`, validated."""
    size = os.path.getsize(path) if path.is_file() else -1
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} as .safetensors: {e}") from None
    header.pop("__metadata__", None)
    body = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            itemsize = np.dtype(DTYPES[dtype]).itemsize
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: damaged header entry for tensor {name!r}") from None
        if not 0 <= begin <= end <= body or end - begin != itemsize * int(
                np.prod(shape, dtype=np.int64)):
            raise UserError(f"{path}: tensor {name!r} is truncated or damaged")
    return header, 8 + n


def read_tensor(path: Path, name: str, header: dict, data_offset: int) -> np.ndarray:
    """A read-only memory map of one tensor (an empty array for zero-size tensors; a 0-d
    tensor, e.g. a scalar threshold, is mapped as one element and reshaped)."""
    info = header[name]
    dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
    if 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_offset + info["data_offsets"][0],
                     shape=shape or (1,)).reshape(shape)


def read_all(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the file, memory-mapped."""
    header, offset = read_header(path)
    return {name: read_tensor(path, name, header, offset) for name in header}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a file of weights, which must all be floating point."""
    tensors = read_all(path)
    for name, tensor in tensors.items():
        if tensor.dtype.kind != "f" and tensor.dtype != ml_dtypes.bfloat16:
            names = ", ".join(k for k, v in DTYPES.items()
                              if np.dtype(v).kind == "f" or v is ml_dtypes.bfloat16)
            raise UserError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; expected a "
                            f"float type ({names})")
    return tensors
