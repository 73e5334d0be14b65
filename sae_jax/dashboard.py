"""A static, server-less feature dashboard: `write_dashboard(RUN_DIR, DATA_DIR, OUT_DIR)`.

OUT_DIR gets `index.html`, `app.js`, `style.css` (copied from `sae_jax/dashboard_assets/`),
`data.js` (the catalog assigned to the global `window.SAE_CATALOG`, so opening index.html
from disk works without fetch() or a web server) and `feature_catalog.json`. The run
directory gets `feature_catalog.json` too, so exports can ship it.

The page: a feature table (id, frequency, mean/max activation, top tokens, label) with search
by id, token or label and sort by any column, a global feature-density histogram (log10
firing frequency), and per feature (`index.html#feature-<id>`) the highlighted token
contexts of its top activations and of samples across its activation distribution, its
log10 activation histogram, its place in the density histogram and its top tokens. Plain
HTML/CSS/JS, no dependencies.
"""

from __future__ import annotations

import os
import shutil
import time
from importlib import resources
from pathlib import Path

from sae_jax import files
from sae_jax.errors import UserError
from sae_jax.interpret import CATALOG_FILE, FeatureCatalog, catalog_for_run, write_catalog

ASSETS = ("index.html", "app.js", "style.css")
DATA_JS = "data.js"


def _asset_dir():
    return resources.files("sae_jax").joinpath("dashboard_assets")


def write_site(catalog: FeatureCatalog, out_dir: str | os.PathLike) -> dict:
    """Writes the static site for an existing catalog into a local `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    assets = _asset_dir()
    for name in ASSETS:
        with resources.as_file(assets.joinpath(name)) as src:
            shutil.copyfile(src, out / name)
    # JSON is JavaScript, except that U+2028/U+2029 end lines in older engines: escape them.
    text = catalog.to_json().replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    files.write_text(out / DATA_JS, "window.SAE_CATALOG = " + text + ";\n")
    write_catalog(catalog, out / CATALOG_FILE)
    return {"index": str(out / "index.html"), "out_dir": str(out),
            "data_js_bytes": (out / DATA_JS).stat().st_size}


def write_dashboard(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None,
                    out_dir: str | os.PathLike, *, split: str = "all", features=None,
                    top_k: int = 10, batch_size: int = 4096, progress: bool = False,
                    **catalog_kwargs) -> dict:
    """`sae-jax dashboard RUN_DIR DATA_DIR OUT_DIR`: catalog + static site.

    Args:
      run_dir: a trained run (`sae_jax.load` must open it).
      data_dir: the activation store to interpret (None: the run's training store).
      out_dir: local directory for the site (created; existing site files are replaced).
      split: "all" rows (default), "train" or "heldout".
      features: None (all), N (features 0..N-1) or a list of feature ids.
      top_k, batch_size, progress, catalog_kwargs: passed to `interpret.build_catalog`.

    Returns:
      A summary dict: `index` (path of index.html), `out_dir`, `catalog` (OUT_DIR's JSON),
      `run_catalog` (RUN_DIR's JSON), `n_features`, `n_rows`, `dead` (features that never
      fired), `seconds`.
    """
    if files.is_remote(str(out_dir)):
        raise UserError("the dashboard OUT_DIR must be a local directory")
    t0 = time.perf_counter()
    catalog = catalog_for_run(run_dir, data_dir, split=split, features=features, top_k=top_k,
                              batch_size=batch_size, progress=progress, **catalog_kwargs)
    run_catalog = write_catalog(catalog, files.join(str(run_dir), CATALOG_FILE))
    site = write_site(catalog, out_dir)
    return {
        **site,
        "catalog": str(Path(out_dir) / CATALOG_FILE),
        "run_catalog": run_catalog,
        "n_features": len(catalog.features),
        "n_rows": catalog.header["n_rows"],
        "dead": sum(1 for f in catalog.features if f["count"] == 0),
        "seconds": round(time.perf_counter() - t0, 3),
    }
