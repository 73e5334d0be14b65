"""The static dashboard: written from a real harvested store and run, and rendered by a real
headless Chromium (the page must build its table and feature view with no script errors).

Needs Debian's chromium: `apt-get install -y chromium` (binary /usr/bin/chromium).
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser",
                       "/usr/bin/google-chrome")
INSTALL_HINT = ("headless Chromium is needed for the dashboard test: install it with "
                "`sudo apt-get update && sudo apt-get install -y chromium` (Debian/Ubuntu), "
                "or set SAE_JAX_CHROMIUM to a Chrome/Chromium binary")


def _chromium() -> str:
    env = os.environ.get("SAE_JAX_CHROMIUM")
    for c in ([env] if env else []) + list(CHROMIUM_CANDIDATES):
        if c and Path(c).exists():
            return c
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    pytest.fail(INSTALL_HINT)


def _browse(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
           "--window-size=1280,1400", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "Uncaught" in line or re.search(r"CONSOLE.*(error|Error)", line)
            or ("CONSOLE" in line and "ERROR" in line)]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`sae-jax dashboard` from the shell on a copy of the session's tiny MiniLM run (the
    copy gets the catalog, so the other tests still see a run without one)."""
    from conftest import json_result, sae_jax_cli
    from test_steer import tiny_minilm_run

    store, run = tiny_minilm_run(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("dashboard")
    shutil.copytree(run, tmp / "run")
    out = sae_jax_cli("dashboard", tmp / "run", store, tmp / "site", "--batch-size", 1024)
    assert "interpret" in out.stderr  # the progress bar ran
    return tmp, json_result(out)


def test_site_is_written(site):
    tmp, summary = site
    out = tmp / "site"
    for name in ("index.html", "app.js", "style.css", "data.js", "feature_catalog.json"):
        assert (out / name).is_file(), name
    assert summary["index"] == str(out / "index.html")
    assert summary["n_features"] == 64 and summary["n_rows"] == 3000
    assert (tmp / "run" / "feature_catalog.json").is_file()
    data = (out / "data.js").read_text(encoding="utf-8")
    assert data.startswith("window.SAE_CATALOG = ") and data.rstrip().endswith(";")
    payload = json.loads(data[len("window.SAE_CATALOG = "):].rstrip().rstrip(";"))
    assert payload == json.loads((out / "feature_catalog.json").read_text(encoding="utf-8"))
    assert payload["header"]["model"] == "all-MiniLM-L6-v2" and payload["header"]["layer"] == 3
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "fetch(" not in html + (out / "app.js").read_text(encoding="utf-8")


def test_index_renders_in_chromium(site):
    tmp, _ = site
    url = (tmp / "site" / "index.html").as_uri()
    res = _browse(url, tmp, "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert 'data-ready="1"' in dom, "app.js did not finish:\n" + res.stderr[-2000:]
    assert not _console_errors(res.stderr), _console_errors(res.stderr)
    assert re.search(r'<div id="errors" class="errors" hidden=""', dom), "page reported errors"
    rows = re.findall(r'<tr data-id="(\d+)"', dom)
    assert len(rows) == 64
    assert "64 of 64 features" in dom
    assert "<svg" in dom  # the density histogram


def test_feature_view_renders_and_screenshot(site):
    tmp, _ = site
    catalog = json.loads((tmp / "site" / "feature_catalog.json").read_text(encoding="utf-8"))
    fid = next(f["id"] for f in catalog["features"] if f["top_examples"])
    url = (tmp / "site" / "index.html").as_uri() + f"#feature-{fid}"
    res = _browse(url, tmp, "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert not _console_errors(res.stderr), _console_errors(res.stderr)
    assert 'data-ready="1"' in dom
    assert f"Feature {fid}</h2>" in dom
    assert re.search(r'<section id="index-view" hidden=""', dom)
    examples = re.findall(r'<div class="example">', dom)
    assert len(examples) >= len(catalog["features"][fid]["top_examples"])
    assert 'class="tok hl"' in dom and "background-color: rgba(240, 140, 0" in dom
    top = catalog["features"][fid]["top_examples"][0]
    shown = top["tokens"][top["highlight_index"]]
    shown = shown[2:] if shown.startswith("##") else shown
    from html import escape

    assert f">{escape(shown, quote=False)}</span>" in dom

    png = tmp / f"feature-{fid}.png"
    shot = _browse(url, tmp, f"--screenshot={png}")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000  # a rendered page, not a blank one
    print(f"\nscreenshot: {png}")


def test_missing_chromium_fails_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_JAX_CHROMIUM", "")
    monkeypatch.setattr(f"{__name__}.CHROMIUM_CANDIDATES", (str(tmp_path / "nope"),))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        _chromium()
