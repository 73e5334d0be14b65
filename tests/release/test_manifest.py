"""The bundle manifest: every file's SHA-256 and size; any change, addition, removal, link or
path leaving the bundle is reported."""

import hashlib
import json
import os

import pytest

from sae_jax.errors import UserError
from sae_jax.release.manifest import (
    FORMAT,
    MANIFEST,
    file_sha256,
    read_manifest,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "b" / "sae").mkdir(parents=True)
    (tmp_path / "b" / "sae" / "cfg.json").write_text('{"d_in": 4}')
    (tmp_path / "b" / "bill.json").write_bytes(b"\x00" * 3000)
    write_manifest(tmp_path / "b")
    return tmp_path / "b"


def test_manifest_lists_every_file_with_hash_and_size(bundle):
    m = read_manifest(bundle)
    assert m["format"] == FORMAT and set(m["files"]) == {"sae/cfg.json", "bill.json"}
    assert m["files"]["bill.json"] == {"sha256": hashlib.sha256(b"\x00" * 3000).hexdigest(),
                                       "bytes": 3000}
    assert file_sha256(bundle / "sae" / "cfg.json") == m["files"]["sae/cfg.json"]["sha256"]
    assert verify_manifest(bundle) == []


def test_every_kind_of_change_is_reported(bundle, tmp_path):
    (bundle / "sae" / "cfg.json").write_text('{"d_in": 5}')  # same size, other bytes
    os.symlink(tmp_path, bundle / "link")
    m = json.loads((bundle / MANIFEST).read_text())
    m["files"]["../outside"] = {"sha256": "0" * 64, "bytes": 1}
    m["files"]["bill.json"]["bytes"] = 1
    (bundle / MANIFEST).write_text(json.dumps(m))
    assert verify_manifest(bundle) == [
        "../outside: listed path leaves the bundle",
        "unlisted: link",
        "bill.json: 3000 bytes, manifest says 1",
        "sae/cfg.json: SHA-256 differs from the manifest"]


@pytest.mark.parametrize("text,needle", [(None, "cannot read manifest.json"),
                                         ("[", "not valid JSON"),
                                         ('{"format": "x"}', "not a sae-jax-bundle/1 manifest"),
                                         ('{"format": "sae-jax-bundle/1", "files": {"a": 1}}',
                                          "'files' must map")])
def test_bad_manifest_is_one_clear_error(bundle, text, needle):
    if text is None:
        (bundle / MANIFEST).unlink()
    else:
        (bundle / MANIFEST).write_text(text)
    with pytest.raises(UserError, match=needle):
        verify_manifest(bundle)
