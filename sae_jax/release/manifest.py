"""A bundle's manifest: the SHA-256 and size of every file, so a changed byte is caught.

`BUNDLE/manifest.json` = `{"format": "sae-jax-bundle/1", "created": ISO time, "files":
{relative path: {"sha256": hex, "bytes": n}}}`, listing every other file of the bundle and
nothing else (the manifest itself excluded; paths '/'-separated, relative to the bundle).
`bundle` writes it last; `verify` and `gate` check it first, before reading anything else,
so a damaged or edited bundle is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from sae_jax.errors import UserError

MANIFEST_FILE = "manifest.json"
FORMAT = "sae-jax-bundle/1"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, streamed (weights files can be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def bundle_files(bundle_dir: str | os.PathLike) -> list[str]:
    """Every path in the bundle except the manifest, relative and '/'-separated, sorted.
    Links and other non-regular entries are listed too, so verification can refuse them."""
    root = Path(bundle_dir)
    out = []
    for dirpath, dirnames, names in os.walk(root):
        here = Path(dirpath)
        for name in names + [d for d in dirnames if (here / d).is_symlink()]:
            rel = (here / name).relative_to(root).as_posix()
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def file_entries(bundle_dir: str | os.PathLike) -> dict[str, dict]:
    """`{relative path: {"sha256", "bytes"}}` of every file of the bundle (the manifest's
    `files`)."""
    root = Path(bundle_dir)
    return {rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in bundle_files(root)}


def write_manifest(bundle_dir: str | os.PathLike) -> dict:
    """Hashes every file of the finished bundle and writes `manifest.json`; returns it.
    Call it last: a file written afterwards would make the bundle fail verification."""
    manifest = {"format": FORMAT,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "files": file_entries(bundle_dir)}
    (Path(bundle_dir) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(bundle_dir: str | os.PathLike) -> dict:
    """The bundle's manifest, its shape checked.

    Raises:
      UserError: no bundle there, no manifest, or one that is not valid JSON of this format.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise UserError(f"no bundle at {bundle_dir} (not a directory)")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{bundle_dir} has no {MANIFEST_FILE}: not a bundle (`sae-jax bundle` "
                        "writes one)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is damaged: {type(e).__name__}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path}: format {got!r}, expected {FORMAT!r}")
    entries = manifest.get("files")
    if not isinstance(entries, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str)
            and isinstance(e.get("bytes"), int) for e in entries.values()):
        raise UserError(f"{path}: `files` must map each path to {{\"sha256\": hex, "
                        "\"bytes\": n}")
    return manifest


def _unsafe(rel: str) -> bool:
    """A listed path that could point outside the bundle (absolute, `..`, backslashes)."""
    p = PurePosixPath(rel)
    return p.is_absolute() or ".." in p.parts or "\\" in rel or rel in ("", ".")


def verify_manifest(bundle_dir: str | os.PathLike) -> list[str]:
    """Checks every file against the manifest; returns one line per problem ([] = intact):
    a listed file missing, not a regular file, or with another size or hash, and any file the
    manifest does not list.

    Raises:
      UserError: see `read_manifest` (no manifest to check against)."""
    root = Path(bundle_dir)
    listed = read_manifest(root)["files"]
    problems = []
    for rel, entry in sorted(listed.items()):
        path = root / rel
        if _unsafe(rel):
            problems.append(f"{rel}: listed path leaves the bundle")
        elif path.is_symlink() or (path.exists() and not path.is_file()):
            problems.append(f"{rel}: not a regular file")
        elif not path.exists():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, manifest says "
                            f"{entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: SHA-256 differs from the manifest")
    problems += [f"{rel}: not in the manifest" for rel in bundle_files(root)
                 if rel not in listed]
    return problems
