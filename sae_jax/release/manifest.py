"""A bundle's layout and its manifest: the file names `bundle` writes and `verify` and `gate`
read, and the SHA-256 + size of every file, which is what makes a bundle checkable by
someone who holds nothing else.

    BUNDLE/manifest.json   {"format": FORMAT, "created": ISO time,
                            "files": {relpath: {"sha256": hex, "bytes": n}}}

lists every other file of the bundle (relative, '/'-separated), and nothing else.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path, PurePosixPath

from sae_jax.errors import UserError
from sae_jax.files import file_sha256

FORMAT = "sae-jax-bundle/1"
MANIFEST = "manifest.json"
SAE_DIR = "sae"
CATALOG = "catalog.json"
EVAL = "reports/eval.json"
AUDIT = "reports/audit.json"
EVALS = "reports/evals.json"
PROVENANCE = "provenance.json"
BILL = "bill.json"
CONTEXTS = "contexts.npz"


def bundle_files(root: str | os.PathLike) -> list[str]:
    """Every file under `root` but the manifest, relative and '/'-separated, sorted (hidden
    files included: a file slipped into a bundle is as suspect as a changed one)."""
    root = Path(root)
    found = []
    for folder, dirs, names in os.walk(root):
        links = [d for d in dirs if (Path(folder) / d).is_symlink()]  # never followed
        for name in names + links:
            rel = (Path(folder) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def write_manifest(root: str | os.PathLike) -> dict:
    """Hashes every file of the bundle folder `root` and writes `root/manifest.json`."""
    root = Path(root)
    listed = {rel: {"sha256": file_sha256(root / rel), "bytes": (root / rel).stat().st_size}
              for rel in bundle_files(root)}
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest = {"format": FORMAT, "created": created, "files": listed}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def strict_loads(text: str, what: str):
    """JSON text parsed strictly: NaN/Infinity and duplicate keys are refused (a bundle is
    written by `files.strict_json`, so either means someone else wrote it). Raises
    ValueError naming `what`."""
    def no_constant(name):
        raise ValueError(f"{what}: non-standard JSON constant {name}")

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{what}: duplicate key in an object")
        return dict(pairs)

    try:
        return json.loads(text, parse_constant=no_constant, object_pairs_hook=unique)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: not valid JSON ({e.msg}, line {e.lineno})") from None


def read_manifest(root: str | os.PathLike) -> dict:
    """The bundle's manifest, checked for shape. Raises ValueError with the reason."""
    path = Path(root) / MANIFEST
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {MANIFEST}: {e}") from None
    manifest = strict_loads(text, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{MANIFEST} is not a {FORMAT} manifest (format {got!r})")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str)
            and isinstance(v.get("bytes"), int) for v in listed.values()):
        raise ValueError(f"{MANIFEST}: 'files' must map each path to {{sha256, bytes}}")
    return manifest


def _unsafe(rel: str) -> bool:
    """A listed path that could point outside the bundle (absolute, `..`, backslashes)."""
    p = PurePosixPath(rel)
    return p.is_absolute() or ".." in p.parts or "\\" in rel or rel in ("", ".")


def compare_files(root: str | os.PathLike, manifest: dict) -> tuple[list[str], list[str]]:
    """What differs between the bundle folder and its manifest: `(listed paths that leave the
    bundle, missing or unlisted files; files not regular or whose size or SHA-256 changed)`,
    one line each."""
    root = Path(root)
    listed, present = manifest["files"], set(bundle_files(root))
    layout = [f"{rel}: listed path leaves the bundle" for rel in sorted(listed) if _unsafe(rel)]
    safe = {rel for rel in listed if not _unsafe(rel)}
    layout += [f"missing: {rel}" for rel in sorted(safe - present)]
    layout += [f"unlisted: {rel}" for rel in sorted(present - safe)]
    changed = []
    for rel in sorted(safe & present):
        want, path = listed[rel], root / rel
        if path.is_symlink() or not path.is_file():
            changed.append(f"{rel}: not a regular file")
        elif path.stat().st_size != want["bytes"]:
            changed.append(f"{rel}: {path.stat().st_size} bytes, manifest says {want['bytes']}")
        elif file_sha256(path) != want["sha256"]:
            changed.append(f"{rel}: SHA-256 differs from the manifest")
    return layout, changed


def verify_manifest(root: str | os.PathLike) -> list[str]:
    """Every problem of a bundle against its manifest, one line each ([] = intact).

    Raises:
      UserError: no readable manifest to check against."""
    try:
        manifest = read_manifest(root)
    except ValueError as e:
        raise UserError(f"bundle {root}: {e}") from None
    layout, changed = compare_files(root, manifest)
    return layout + changed
