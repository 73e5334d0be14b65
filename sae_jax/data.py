"""A simple activation store and the step-indexed batch order.

Store layout (a directory): `activations.npy` (N, d_in) float32/bfloat16/float16, read by
memory map, and `meta.json` (`d_in`, `n_rows`, `dtype`, `source`). The batch of step `s`
is a pure function of `(seed, s)`, so a resumed run sees exactly the batches an
uninterrupted one would have, with no loader state to save.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from sae_jax.errors import UserError

ROWS_FILE = "activations.npy"
META_FILE = "meta.json"
CHUNK_ROWS = 65536
STORE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Store:
    """An opened store: `rows` is a read-only (N, d_in) memory map."""

    path: Path
    rows: np.ndarray
    meta: dict

    @property
    def d_in(self) -> int:
        return int(self.rows.shape[1])

    def split(self, holdout: float) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, held-out rows): the held-out rows are the store's tail.

        The tail holds the last documents harvested, so no document is in both halves.
        """
        n_eval = max(1, int(round(holdout * len(self.rows))))
        if n_eval >= len(self.rows):
            raise UserError(f"store {self.path} has {len(self.rows)} rows: too few to hold out "
                            f"{holdout:.0%} for eval and still train")
        return self.rows[:-n_eval], self.rows[-n_eval:]


def _load_npy(path: Path) -> np.ndarray:
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as a .npy array: {e}") from None
    if rows.dtype == np.dtype("V2"):  # numpy writes bfloat16 as raw 2-byte void
        rows = rows.view(ml_dtypes.bfloat16)
    return rows


def check_rows(rows: np.ndarray, where: str) -> None:
    """Rejects anything that is not a non-empty 2-D float array."""
    if rows.ndim != 2:
        raise UserError(f"{where}: expected a 2-D (rows, d_in) array, got shape {rows.shape}")
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise UserError(f"{where}: array is empty (shape {rows.shape})")
    if rows.dtype.name not in STORE_DTYPES and rows.dtype != np.float64:
        raise UserError(f"{where}: activations must be floating point, got dtype {rows.dtype}")


def import_npy(src: str | os.PathLike, data_dir: str | os.PathLike) -> Store:
    """Copies an (N, d) float `.npy` into a new store, chunk by chunk.

    float64 is stored as float32. NaN/Inf rows are rejected with their count. The store is
    written under a temporary name and renamed at the end, so a failure leaves nothing.
    """
    src, data_dir = Path(src), Path(data_dir)
    if not src.is_file():
        raise UserError(f"no such file: {src}")
    if (data_dir / META_FILE).exists():
        raise UserError(f"{data_dir} already holds a store; choose a new directory")
    rows = _load_npy(src)
    check_rows(rows, str(src))
    dtype = np.float32 if rows.dtype == np.float64 else rows.dtype
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.", dir=data_dir.parent))
    try:
        out = np.lib.format.open_memmap(tmp / ROWS_FILE, mode="w+", dtype=dtype,
                                        shape=rows.shape)
        bad = 0
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = np.asarray(rows[start:start + CHUNK_ROWS])
            bad += int((~np.isfinite(chunk.astype(np.float32))).any(axis=1).sum())
            out[start:start + len(chunk)] = chunk.astype(dtype)
        if bad:
            raise UserError(f"{src}: {bad} of {len(rows)} rows contain NaN or Inf")
        out.flush()
        del out
        meta = {"d_in": int(rows.shape[1]), "n_rows": int(rows.shape[0]),
                "dtype": np.dtype(dtype).name, "source": str(src.resolve())}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if data_dir.exists():
            _move_into(tmp, data_dir)
        else:
            os.replace(tmp, data_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_store(data_dir)


def _move_into(tmp: Path, data_dir: Path) -> None:
    """Moves the finished files into an existing (empty or store-less) directory."""
    os.replace(tmp / ROWS_FILE, data_dir / ROWS_FILE)
    os.replace(tmp / META_FILE, data_dir / META_FILE)


def open_store(data_dir: str | os.PathLike) -> Store:
    """Opens a store written by `import_npy`, checking its metadata against the array."""
    data_dir = Path(data_dir)
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise UserError(f"no activation store at {data_dir} (missing {META_FILE}); "
                        "create one with `sae-jax import`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path} is not valid JSON: {e}") from None
    rows = _load_npy(data_dir / ROWS_FILE)
    check_rows(rows, str(data_dir / ROWS_FILE))
    if [meta.get("n_rows"), meta.get("d_in")] != list(rows.shape):
        raise UserError(f"store {data_dir} is inconsistent: meta.json says "
                        f"{meta.get('n_rows')}x{meta.get('d_in')}, array is {rows.shape}")
    return Store(data_dir, rows, meta)


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n_rows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def batch_indices(seed: int, step: int, batch_size: int, n_rows: int) -> np.ndarray:
    """Row indices of step `step`'s batch: consecutive slices of per-epoch permutations.

    Epoch e is `permutation(n_rows)` seeded by (seed, e); batches may cross epochs. Sorted,
    because reading a memory map in order is faster and a batch is a set.
    """
    parts, start, missing = [], step * batch_size, batch_size
    while missing:
        epoch, offset = divmod(start, n_rows)
        take = _epoch_order(seed, epoch, n_rows)[offset:offset + missing]
        parts.append(take)
        start, missing = start + len(take), missing - len(take)
    return np.sort(np.concatenate(parts))


def estimate_stats(rows: np.ndarray, max_rows: int = 100_000) -> tuple[float, np.ndarray]:
    """Input scale c with E‖c·x‖² = d_in, and the mean of c·x, from an even sample of rows.

    Returns:
      `(scale, scaled_mean)`.
    """
    stride = max(1, len(rows) // max_rows)
    sample = np.asarray(rows[::stride][:max_rows], dtype=np.float32)
    mean_sq_norm = float(np.mean(np.sum(np.square(sample, dtype=np.float64), axis=1)))
    if not np.isfinite(mean_sq_norm) or mean_sq_norm == 0:
        raise UserError("cannot scale the inputs: their mean squared norm is "
                        f"{mean_sq_norm} (all zeros or non-finite?)")
    scale = float(np.sqrt(rows.shape[1] / mean_sq_norm))
    return scale, (sample.mean(0) * scale).astype(np.float32)
