"""A static, server-less feature dashboard: `write_dashboard(RUN_DIR, DATA_DIR, OUT_DIR)`.

OUT_DIR gets `index.html`, `app.js`, `style.css` (copied from `sae_jax/analysis/dashboard_assets/`),
`data.js` (the catalog assigned to the global `window.SAE_CATALOG`, so opening index.html
from disk works without fetch() or a web server), `audit.js` (the run's `sae-jax audit`
report as `window.SAE_AUDIT`, or null), `evals.js` (the run's `sae-jax evals` report as
`window.SAE_EVALS`, or null) and `feature_catalog.json`. The run directory gets
`feature_catalog.json` too, so exports can ship it.

The page: a feature table (id, frequency, mean/max activation, top tokens, label) with search
by id, token or label and sort by any column, a global feature-density histogram (log10
firing frequency), and per feature (`index.html#feature-<id>`) the highlighted token
contexts of its top activations and of samples across its activation distribution, its
log10 activation histogram, its place in the density histogram and its top tokens. When the
run has an audit (`RUN_DIR/audit/audit.json`), the index also shows an Audit section (score
medians and real-vs-random histograms, best/worst features linking to their pages, coverage
and dark-matter contexts), the table gets causal and explanatory columns, and each audited
feature's page its scores. When the run has an evals report (`RUN_DIR/evals/evals.json`, or
that of the sweep it belongs to: `evals.read_evals`), the index shows an Evals table: per
metric the mean ± 95 % CI across runs, each random baseline and the margin over it, and
PW-MCC. A crosscoder diff's site (`sae-jax diff RUN DATA`, `diff_dashboard`) adds `diff.js`
(`window.SAE_DIFF`, null otherwise): a Model diff section on the index and, on each
exclusive latent's page, each example's pre-activation and decoder write per model.
Plain HTML/CSS/JS, no dependencies.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

from sae_jax import files
from sae_jax.analysis.audit_report import read_audit
from sae_jax.analysis.catalog import CATALOG_FILE, FeatureCatalog, write_catalog
from sae_jax.analysis.evals import read_evals
from sae_jax.analysis.interpret import catalog_for_run
from sae_jax.errors import UserError

ASSETS = ("index.html", "app.js", "style.css")
DATA_JS = "data.js"
AUDIT_JS = "audit.js"
EVALS_JS = "evals.js"
DIFF_JS = "diff.js"
EVALS_SHOWN = ("runs", "n_runs", "suites", "ci_level", "metrics", "pw_mcc")
"""The parts of an evals report the page shows (not the per-suite `detail`)."""


def _asset_dir():
    return resources.files("sae_jax.analysis").joinpath("dashboard_assets")


def _script(name: str, text: str) -> str:
    """`window.NAME = <JSON>;`. JSON is JavaScript, except that U+2028/U+2029 end lines in
    older engines: escape them."""
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"window.{name} = {text};\n"


def _copy_assets(out: Path) -> None:
    assets = _asset_dir()
    for name in ASSETS:
        with resources.as_file(assets.joinpath(name)) as src:
            shutil.copyfile(src, out / name)


def write_site(catalog: FeatureCatalog, out_dir: str | os.PathLike,
               audit: dict | None = None, evals: dict | None = None,
               diff: dict | None = None) -> dict:
    """Writes the static site for an existing catalog (and audit and evals reports, and a
    crosscoder diff: `diff_dashboard`) into `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / DATA_JS, _script("SAE_CATALOG", catalog.to_json()))
    _write_audit(audit, out)
    shown = None if evals is None else {k: evals[k] for k in EVALS_SHOWN if k in evals}
    files.write_text(out / EVALS_JS, _script("SAE_EVALS", files.strict_json(shown)))
    files.write_text(out / DIFF_JS, _script("SAE_DIFF", files.strict_json(diff)))
    write_catalog(catalog, out / CATALOG_FILE)
    return {"index": str(out / "index.html"), "out_dir": str(out),
            "data_js_bytes": (out / DATA_JS).stat().st_size}


def write_audit_js(audit: dict, site_dir: str | os.PathLike) -> str:
    """Adds an audit report to an existing dashboard site (its assets are refreshed, so a
    site written before audits existed shows it too). Returns the `audit.js` path."""
    out = Path(site_dir)
    if not (out / DATA_JS).is_file():
        raise UserError(f"{out} is not a dashboard site (no {DATA_JS}); write one with "
                        "`sae-jax dashboard` first")
    return _write_audit(audit, out)


def _write_audit(audit: dict | None, out: Path) -> str:
    """Writes `audit.js` with fresh assets (a site written before audits existed shows it
    too); returns its path."""
    _copy_assets(out)
    files.write_text(out / AUDIT_JS, _script("SAE_AUDIT", json.dumps(
        audit, allow_nan=False, ensure_ascii=False)))
    return str(out / AUDIT_JS)


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
      fired), `audit` / `evals` (whether the run's audit / evals report is shown),
      `seconds`.
    """
    if files.is_remote(str(out_dir)):
        raise UserError("the dashboard OUT_DIR must be a local directory")
    t0 = time.perf_counter()
    catalog = catalog_for_run(run_dir, data_dir, split=split, features=features, top_k=top_k,
                              batch_size=batch_size, progress=progress, **catalog_kwargs)
    run_catalog = write_catalog(catalog, files.join(str(run_dir), CATALOG_FILE))
    audit = read_audit(run_dir)
    evals = read_evals(run_dir)
    site = write_site(catalog, out_dir, audit, evals)
    return {
        **site,
        "catalog": str(Path(out_dir) / CATALOG_FILE),
        "run_catalog": run_catalog,
        "n_features": len(catalog.features),
        "n_rows": catalog.header["n_rows"],
        "dead": sum(1 for f in catalog.features if f["count"] == 0),
        "audit": audit is not None,
        "evals": evals is not None,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def add_arguments(parser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("data_dir", help="a harvested store (token contexts need its metadata)")
    parser.add_argument("out_dir", help="where to write index.html")
    parser.add_argument("--split", choices=("all", "train", "heldout"), default="all",
                        help="rows to scan for examples (default: all)")
    parser.add_argument("--features", type=int,
                        help="only the first N features (default: all)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> dict:
    result = write_dashboard(args.run_dir, args.data_dir, args.out_dir, split=args.split,
                             features=args.features, batch_size=args.batch_size,
                             progress=not args.quiet)
    print(f"dashboard: open {result['index']} in a browser", file=sys.stderr)
    return result
