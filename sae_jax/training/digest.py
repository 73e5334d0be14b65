"""SHA-256 digests of checkpoint steps: proof that a step's files are still what was written.

Orbax checks nothing when it restores: a flipped byte in a data file restores silently as a
value like 3e38 and the run later dies with NaN; a deleted file fails with an error that
looks like any other. A digest is a small JSON file inside the step directory,
`{"algorithm": "sha256", "files": {relative path: hex digest}}`, written after Orbax has
committed the step (see `checkpoint.Manager`) and atomically (a hidden temporary file renamed
into place locally, one put on object stores). Checking it tells a damaged step (a listed
file changed or missing) from an intact one without decoding anything.

Local steps are hashed by streaming each file; steps on object stores (`gs://`) are listed and
read through tensorstore's key-value store, the package's way to reach them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tensorstore as ts

from sae_jax import files

DIGEST_FILE = "sae_jax_digest.json"
ALGORITHM = "sha256"

OK, UNDIGESTED, DAMAGED = "ok", "undigested", "damaged"
"""What `check_digest` finds: every listed file matches / the step has no digest / a listed file
differs or is missing (or the digest itself is unreadable)."""


def _ignored(name: str) -> bool:
    """sae_jax's own files in a step (the digest, its temporary file, a quarantine marker)."""
    return name.rsplit("/", 1)[-1].startswith(("sae_jax_", ".sae_jax_"))


def _local_hashes(step_dir: Path, under: str) -> dict[str, str]:
    out = {}
    for root, _, names in os.walk(step_dir / under if under else step_dir):
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(step_dir).as_posix()
            if not _ignored(rel):
                with open(path, "rb") as f:
                    out[rel] = hashlib.file_digest(f, ALGORITHM).hexdigest()
    return out


def _remote_hashes(step_dir: str, under: str) -> dict[str, str]:
    store = ts.KvStore.open(files.kvstore_url(step_dir), context=files.CONTEXT).result()
    out = {}
    for key in store.list().result():
        rel = key.decode()
        if _ignored(rel) or (under and not rel.startswith(f"{under}/")):
            continue
        value = store.read(key).result()
        if value.state == "value":
            out[rel] = hashlib.new(ALGORITHM, value.value).hexdigest()
    return out


def file_hashes(step_dir, under: str = "") -> dict[str, str]:
    """SHA-256 of every file of the step (or only those under the folder `under`), keyed by
    path relative to the step, '/'-separated."""
    if files.is_remote(step_dir):
        return _remote_hashes(str(step_dir), under)
    return _local_hashes(Path(step_dir), under)


def write_digest(step_dir) -> dict:
    """Hashes every file of a committed step and writes the digest into it; returns it.

    Call it only once the step is final (Orbax has finished and committed it): a digest of a
    step still being written would brand a good checkpoint as damaged."""
    digest = {"algorithm": ALGORITHM, "files": dict(sorted(file_hashes(step_dir).items()))}
    files.write_text(files.join(step_dir, DIGEST_FILE), json.dumps(digest, indent=1) + "\n")
    return digest


def check_digest(step_dir, under: str = "") -> tuple[str, str]:
    """`(OK | UNDIGESTED | DAMAGED, detail)` for a step, or only its files under `under`.

    Files the digest does not list (written later by something else) are ignored; a listed
    file that differs or is missing, or a digest that is not valid JSON, is damage. Read
    errors (a timeout on an object store) propagate: they prove nothing about the files."""
    text = files.read_text(files.join(step_dir, DIGEST_FILE))
    if text is None:
        return UNDIGESTED, "no digest"
    try:
        listed = json.loads(text)["files"]
        assert isinstance(listed, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        return DAMAGED, f"its {DIGEST_FILE} is unreadable"
    if under:
        listed = {k: v for k, v in listed.items() if k.startswith(f"{under}/")}
    actual = file_hashes(step_dir, under)
    missing = sorted(set(listed) - set(actual))
    changed = sorted(k for k in listed if k in actual and actual[k] != listed[k])
    if not missing and not changed:
        return OK, f"{len(listed)} files match the digest"
    parts = ([f"{len(missing)} file(s) missing, e.g. {missing[0]}"] if missing else []) + (
        [f"{len(changed)} file(s) changed, e.g. {changed[0]}"] if changed else [])
    return DAMAGED, "; ".join(parts)
