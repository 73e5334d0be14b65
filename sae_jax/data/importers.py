"""`sae-jax import`: activations from any framework into a store.

Accepts a `.npy`, a `.safetensors` (a chosen tensor, by default the only one) or a folder
of such files (concatenated in name order); or several of those, aligned row for row, as the
sources of a multi-source store (each row = the sources' rows side by side, for
crosscoders). Files are memory-mapped and copied in chunks, never loaded whole; bad input is
rejected with one line and leaves no store behind. So do Ctrl-C and SIGTERM: both stop the
copy between chunks and remove what was written (a kill -9 cannot be caught; the next import
or harvest into the same folder removes what it left, see `staging`).
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


def open_rows(src: Path, tensor: str | None) -> tuple[list[Path], list[np.ndarray]]:
    """The files of one source (`src` itself or its folder's files) and their arrays, all of
    one width."""
    files = list_sources(src)
    arrays = [open_source(f, tensor) for f in files]
    if len({a.shape[1] for a in arrays}) > 1:
        detail = ", ".join(f"{f.name}: {a.shape[1]}" for f, a in zip(files, arrays))
        raise UserError(f"files have different widths ({detail})")
    return files, arrays


def source_names(srcs: list[Path], names: list[str] | None) -> list[str]:
    """One unique name per source: `names`, or each path's stem."""
    return checked_names([p.stem for p in srcs] if names is None else list(names), len(srcs))


def checked_names(names: list[str], n_sources: int) -> list[str]:
    """`names` if there is one per source, all unique and non-empty; else one line."""
    if len(names) != n_sources:
        raise UserError(f"--names gives {len(names)} names for {n_sources} sources")
    if len(set(names)) < len(names) or not all(names):
        raise UserError(f"source names must be unique and non-empty, got {', '.join(names)}; "
                        "name them with --names A,B")
    return names


def import_activations(src: str | os.PathLike | list, data_dir: str | os.PathLike,
                       tensor: str | None = None, names: list[str] | None = None):
    """Copies activations into a new store (bfloat16 stays bfloat16, others -> float32).

    Args:
      src: a file or folder; or several, which are aligned *sources* (row i of each is the
        same token, e.g. two models at one layer): the store's row i is their rows i side by
        side, and `meta["sources"]` records each source's name and width (`model`, `hash`,
        `layer`, `site` None: an import does not know them), for crosscoders.
      names: the sources' names (default: the file or folder stems).

    Rejects files of different widths within a source, sources of different row counts,
    non-float dtypes, empty arrays, and NaN/Inf rows (counted over all files before failing).

    Returns:
      The opened `store.Store`.
    """
    srcs = [Path(p) for p in (src if isinstance(src, (list, tuple)) else [src])]
    opened = [open_rows(p, tensor) for p in srcs]
    sources = [arrays for _, arrays in opened]
    counts = [sum(len(a) for a in arrays) for arrays in sources]
    if len(set(counts)) > 1:
        detail = ", ".join(f"{p.name}: {n}" for p, n in zip(srcs, counts))
        raise UserError(f"sources must be aligned row for row, but have different row counts "
                        f"({detail})")
    widths = [arrays[0].shape[1] for arrays in sources]
    bf16 = all(a.dtype == ml_dtypes.bfloat16 for arrays in sources for a in arrays)
    if len(srcs) == 1:
        meta = {"source": str(srcs[0].absolute()), "files": [f.name for f in opened[0][0]],
                "tensor": tensor}
    else:
        meta = {"sources": [{"name": name, "d": d, "model": None, "hash": None, "layer": None,
                             "site": None, "path": str(p.absolute()),
                             "files": [f.name for f in files]}
                            for name, d, p, (files, _) in zip(source_names(srcs, names), widths,
                                                              srcs, opened)],
                "tensor": tensor}
    with (signal_flag(signal.SIGTERM) as terminated,
          signal_flag(signal.SIGINT, repeat_raises=True) as interrupted):
        writer = StoreWriter(data_dir, d_in=sum(widths),
                             dtype="bfloat16" if bf16 else "float32", meta=meta)
        try:
            _copy(sources, counts[0], writer, srcs, terminated, interrupted)
        except BaseException:
            writer.abort()
            raise
        return writer.close()


def _read(arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the arrays read as one, in float32."""
    parts, offset = [], 0
    for rows in arrays:
        i, j = max(start - offset, 0), min(stop - offset, len(rows))
        if i < j:
            parts.append(np.asarray(rows[i:j]).astype(np.float32))
        offset += len(rows)
    return np.concatenate(parts)


def _copy(sources: list[list[np.ndarray]], n_rows: int, writer: StoreWriter, srcs: list[Path],
          terminated, interrupted) -> None:
    """Appends the rows in chunks of `CHUNK_ROWS` (each source's rows side by side), stopping
    between chunks when a signal flag is set; NaN/Inf rows are counted over everything
    before failing."""
    bad = 0
    for start in range(0, n_rows, CHUNK_ROWS):
        if terminated.is_set():
            raise Preempted(f"import stopped by SIGTERM; nothing was written to "
                            f"{writer.final} (rerun the command to import)")
        if interrupted.is_set():
            raise KeyboardInterrupt
        stop = min(start + CHUNK_ROWS, n_rows)
        chunk = np.concatenate([_read(arrays, start, stop) for arrays in sources], axis=1)
        bad += int((~np.isfinite(chunk)).any(axis=1).sum())
        if not bad:
            writer.append(chunk)
    if bad:
        raise UserError(f"{', '.join(map(str, srcs))}: {bad} of {n_rows} rows contain NaN or Inf")


def add_arguments(parser) -> None:
    parser.add_argument("src", nargs="+",
                        help="a .npy or .safetensors file of shape (N, d), or a folder of them; "
                             "several are aligned sources (e.g. two models at one layer) put "
                             "side by side in each row, for crosscoders")
    parser.add_argument("data_dir", help="new store (a local path or gs://bucket/path)")
    parser.add_argument("--tensor",
                        help="which tensor of a .safetensors file (default: the only one)")
    parser.add_argument("--names", type=lambda s: s.split(","),
                        help="comma-separated names of several sources (default: the file or "
                             "folder names)")


def run(args) -> dict:
    if args.names is not None and len(args.src) == 1:
        raise UserError("--names is for several sources; give two or more SRC")
    store = import_activations(args.src, args.data_dir, args.tensor, args.names)
    return {"data_dir": store.path, **store.meta}
