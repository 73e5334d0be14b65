"""`sae-jax import`: activations from any framework into a store.

Accepts a `.npy`, a `.safetensors` (a chosen tensor, by default the only one) or a folder
of such files (concatenated in name order). Files are memory-mapped and copied in chunks,
never loaded whole; bad input is rejected with one line and leaves no store behind. So do
Ctrl-C and SIGTERM: both stop the copy between chunks and remove what was written (a
kill -9 cannot be caught; the next import or harvest into the same folder removes what it
left, see `staging`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import ml_dtypes
import numpy as np

from sae_jax.data import safetensors_io
from sae_jax.data.store import StoreWriter
from sae_jax.errors import Preempted, UserError
from sae_jax.interrupts import signal_flag

SUFFIXES = (".npy", ".safetensors")
CHUNK_ROWS = 65536


def _open_npy(path: Path) -> np.ndarray:
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as a .npy array: {e}") from None
    if rows.dtype == np.dtype("V2"):  # numpy writes bfloat16 as raw 2-byte void
        rows = rows.view(ml_dtypes.bfloat16)
    return rows


def _open_safetensors(path: Path, tensor: str | None) -> np.ndarray:
    """Memory-maps one tensor (by default the only one) of a safetensors file."""
    header, offset = safetensors_io.read_header(path)
    names = sorted(header)
    if tensor is None:
        if len(names) != 1:
            raise UserError(f"{path} holds {len(names)} tensors ({', '.join(names)}); "
                            "choose one with --tensor NAME")
        tensor = names[0]
    if tensor not in header:
        raise UserError(f"{path} has no tensor {tensor!r}; it has: {', '.join(names)}")
    return safetensors_io.read_tensor(path, tensor, header, offset)


def open_source(path: Path, tensor: str | None = None) -> np.ndarray:
    """A read-only (N, d) view of one file, checked to be a non-empty 2-D float array."""
    rows = _open_npy(path) if path.suffix == ".npy" else _open_safetensors(path, tensor)
    if rows.ndim != 2:
        raise UserError(f"{path}: expected a 2-D (rows, d_in) array, got shape {rows.shape}")
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise UserError(f"{path}: array is empty (shape {rows.shape})")
    if rows.dtype.kind != "f" and rows.dtype != ml_dtypes.bfloat16:
        raise UserError(f"{path}: activations must be floating point, got dtype {rows.dtype}")
    return rows


def list_sources(src: Path) -> list[Path]:
    """The files to import: `src` itself, or the .npy/.safetensors files of a folder."""
    if src.is_file():
        if src.suffix not in SUFFIXES:
            raise UserError(f"{src}: expected a .npy or .safetensors file")
        return [src]
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"{src} holds no .npy or .safetensors files")
        return files
    raise UserError(f"no such file or folder: {src}")


def import_activations(src: str | os.PathLike, data_dir: str | os.PathLike,
                       tensor: str | None = None):
    """Copies activations into a new store (bfloat16 stays bfloat16, others -> float32).

    Rejects files of different widths, non-float dtypes, empty arrays, and NaN/Inf rows
    (counted over all files before failing).

    Returns:
      The opened `store.Store`.
    """
    files = list_sources(Path(src))
    arrays = [open_source(f, tensor) for f in files]
    widths = {a.shape[1] for a in arrays}
    if len(widths) > 1:
        detail = ", ".join(f"{f.name}: {a.shape[1]}" for f, a in zip(files, arrays))
        raise UserError(f"files have different widths ({detail})")
    bf16 = all(a.dtype == ml_dtypes.bfloat16 for a in arrays)
    meta = {"source": str(Path(src).absolute()), "files": [f.name for f in files],
            "tensor": tensor}
    with (signal_flag(signal.SIGTERM) as terminated,
          signal_flag(signal.SIGINT, repeat_raises=True) as interrupted):
        writer = StoreWriter(data_dir, d_in=widths.pop(),
                             dtype="bfloat16" if bf16 else "float32", meta=meta)
        try:
            _copy(arrays, writer, src, terminated, interrupted)
        except BaseException:
            writer.abort()
            raise
        return writer.close()


def _copy(arrays: list[np.ndarray], writer: StoreWriter, src, terminated, interrupted) -> None:
    """Appends the arrays in chunks of `CHUNK_ROWS`, stopping between chunks when a signal
    flag is set; NaN/Inf rows are counted over everything before failing."""
    bad = total = 0
    for rows in arrays:
        for start in range(0, len(rows), CHUNK_ROWS):
            if terminated.is_set():
                raise Preempted(f"import stopped by SIGTERM; nothing was written to "
                                f"{writer.final} (rerun the command to import)")
            if interrupted.is_set():
                raise KeyboardInterrupt
            chunk = np.asarray(rows[start:start + CHUNK_ROWS]).astype(np.float32)
            bad += int((~np.isfinite(chunk)).any(axis=1).sum())
            total += len(chunk)
            if not bad:
                writer.append(chunk)
    if bad:
        raise UserError(f"{src}: {bad} of {total} rows contain NaN or Inf")


def add_arguments(parser) -> None:
    parser.add_argument("src",
                        help="a .npy or .safetensors file of shape (N, d), or a folder of them")
    parser.add_argument("data_dir", help="new store (a local path or gs://bucket/path)")
    parser.add_argument("--tensor",
                        help="which tensor of a .safetensors file (default: the only one)")


def run(args) -> dict:
    store = import_activations(args.src, args.data_dir, args.tensor)
    return {"data_dir": store.path, **store.meta}
