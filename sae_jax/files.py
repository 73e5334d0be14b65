"""Small files on a local disk or in object storage (`gs://...`), through tensorstore's
key-value stores, so run directories and stores work the same on a laptop and a TPU pod.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import tensorstore as ts

CONTEXT = ts.Context()
"""One tensorstore context for the package: shared caches and object-store connections
(and a `memory://` store that tests can use in place of `gs://`)."""


def is_remote(path) -> bool:
    return "://" in str(path)


def join(base, *names: str) -> str:
    """`base/name/...` as a string, for local paths and URLs alike."""
    return "/".join([str(base).rstrip("/"), *names])


def kvstore_url(path) -> str:
    """A tensorstore kvstore URL: `gs://...` as is, local paths as `file://` (absolute)."""
    path = str(path).rstrip("/")
    return f"{path}/" if is_remote(path) else f"file://{Path(path).absolute()}/"


def _split(path) -> tuple[ts.KvStore, str]:
    parent, name = str(path).rstrip("/").rsplit("/", 1)
    return ts.KvStore.open(kvstore_url(parent), context=CONTEXT).result(), name


def read_text(path) -> str | None:
    """The file's text, or None if it does not exist."""
    if not is_remote(path):
        return Path(path).read_text() if Path(path).is_file() else None
    store, name = _split(path)
    value = store.read(name).result()
    return value.value.decode() if value.state == "value" else None


def read_json(path, missing: str):
    """The parsed JSON file at `path`. A missing file raises `UserError(missing)`; a file that
    is not JSON raises `UserError("<path> is not valid JSON (...)")`."""
    from sae_jax.errors import UserError

    text = read_text(path)
    if text is None:
        raise UserError(missing)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): damaged or "
                        "not written by sae_jax") from None


def write_bytes(path, data: bytes) -> None:
    """Replaces a whole file atomically: locally through a hidden temporary file renamed
    into place (parent directories are created), on object stores in one put, so a crash
    never leaves a half-written file."""
    if not is_remote(path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    store, name = _split(path)
    store.write(name, data).result()


def write_text(path, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode())


def ensure_writable_dir(path, what: str) -> None:
    """Creates the local directory `path` if needed and proves it writable by writing to it,
    before any work whose result would go there (a result computed and then unsaveable is
    lost work). Raises a one-line UserError naming `what`. Object stores are not probed."""
    from sae_jax.errors import UserError

    if is_remote(path):
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory")
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {what} to {path}: {e.strerror or e}") from None


def file_sha256(path) -> str:
    """Hex SHA-256 of a local file, streamed: the one file hash of model weights and bundles."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def exists(path) -> bool:
    return read_text(path) is not None


def strict_json(value, indent: int | None = None) -> str:
    """`value` as strict JSON text (`json_safe` first: NaN and ±Infinity become null), the
    one encoding of every JSON line and file the package writes from computed results."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False)


def json_safe(value):
    """NaN/Inf -> None (strict JSON), numpy arrays and scalars -> Python lists and numbers,
    recursively: what every JSON result file of the package is passed through."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
