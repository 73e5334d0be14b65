"""`sae-jax bundle RUN OUT`: the auditable unit of an SAE release, in one folder.

    OUT/manifest.json          SHA-256 and size of every other file (`release.manifest`)
    OUT/sae/                   the SAELens export (cfg.json, sae_weights.safetensors)
    OUT/catalog.json           the run's feature catalog
    OUT/reports/eval.json      `sae-jax eval`'s result
    OUT/reports/audit.json     `sae-jax audit`'s report, when there is one (or --audit)
    OUT/reports/evals.json     only if the run has one
    OUT/provenance.json        model + weight hashes, hook, corpus hash, tokens, config, code
    OUT/bill.json              steps, tokens, measured wall time, chip-hours (`release.provenance`)
    OUT/contexts.npz           sampled top activations with their sequences (`release.contexts`)

What the run lacks is made as its own command would make it, and kept in the run where that
command keeps it: a catalog (as `sae-jax dashboard` builds it, into RUN/feature_catalog.json)
and the eval (`sae-jax eval`, into RUN/eval/eval.json); one made for an older checkpoint than
the SAE's is made again. The audit is slow, so it runs only with `--audit`; an existing
RUN/audit/audit.json is included unless `--no-audit`.

The bundle is written into a hidden folder next to OUT and renamed into place at the end, so
OUT is either absent or whole. OUT must not exist, or be an empty folder.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
import uuid
from argparse import Namespace
from pathlib import Path

import numpy as np

from sae_jax import files
from sae_jax.errors import UserError
from sae_jax.release import manifest as names
from sae_jax.release.contexts import build_contexts
from sae_jax.release.provenance import DEFAULT_ACCELERATOR, bill, provenance

EVALS_FILES = ("evals/evals.json", "evals.json")
"""Where a run may hold `sae-jax evals` results (a command still to come)."""


def _check_out(out: Path) -> None:
    if files.is_remote(str(out)):
        raise UserError("the bundle OUT must be a local folder")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new OUT")
    files.ensure_writable_dir(out.parent, "the bundle")


def _same_place(a, b) -> bool:
    if files.is_remote(str(a)) or files.is_remote(str(b)):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _catalog(run_dir, sae, data_dir, batch_size: int, progress: bool, log):
    """The run's catalog, built (and kept in the run, as `sae-jax dashboard` does) when it has
    none, or one of another checkpoint or store (its rows would not be this store's)."""
    from sae_jax.analysis.catalog import CATALOG_FILE, find_catalog, write_catalog
    from sae_jax.analysis.interpret import catalog_for_run

    catalog = find_catalog(run_dir)
    if (catalog is not None and catalog.header.get("step") == sae.step
            and _same_place(catalog.header.get("data_dir") or "", data_dir)):
        return catalog
    log("building the feature catalog (as sae-jax dashboard does)")
    catalog = catalog_for_run(run_dir, data_dir, batch_size=batch_size, progress=progress)
    write_catalog(catalog, files.join(str(run_dir), CATALOG_FILE))
    return catalog


def _eval_report(run_dir, sae, data_dir, fidelity_sequences: int, corpus, log) -> dict:
    """RUN/eval/eval.json, re-run with `sae-jax eval` when missing or of another step."""
    from sae_jax.analysis import evaluate

    path = files.join(str(run_dir), "eval", evaluate.EVAL_JSON)
    text = files.read_text(path)
    if text is not None:
        report = files.read_json(path, f"no eval report at {path}")
        if isinstance(report, dict) and report.get("step") == sae.step:
            return report
    log(f"running sae-jax eval ({fidelity_sequences} fidelity sequences)")
    return evaluate.run(Namespace(run_dir=str(run_dir), data_dir=str(data_dir),
                                  split="heldout", fidelity_sequences=fidelity_sequences,
                                  corpus=corpus, mesh=""))


def _audit_report(run_dir, data_dir, mode: str | None, corpus, log) -> dict | None:
    """The run's audit report: run now (`mode="run"`), none (`"skip"`), or the existing one."""
    from sae_jax.analysis.audit_report import read_audit

    if mode == "skip":
        return None
    if mode == "run":
        from sae_jax.analysis.audit import audit

        log("running sae-jax audit")
        return audit(run_dir, data_dir, corpus=corpus, log=log)
    return read_audit(run_dir)


def _check_recorded(sae, store, contexts: dict) -> None:
    """The sampled values must be what the SAE gives on the stored rows: a catalog that does
    not belong to this SAE and store is refused here, not found out by an auditor later."""
    from sae_jax.data.store import ROWS
    from sae_jax.release.contexts import ATOL, RTOL

    rows = np.concatenate(store.read_many(ROWS, [(int(r), int(r) + 1) for r in contexts["row"]]))
    got = np.asarray(sae.encode(rows.astype(np.float32)[:, :sae.d_in]))
    got = got[np.arange(len(rows)), contexts["feature"]]
    off = np.abs(got - contexts["value"]) > ATOL + RTOL * np.abs(contexts["value"])
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise UserError(f"the run's catalog does not match its SAE on store {store.path} "
                        f"({int(off.sum())} of {len(off)} sampled values differ, e.g. feature "
                        f"{contexts['feature'][i]} row {contexts['row'][i]}: {got[i]:.6g} vs "
                        f"{contexts['value'][i]:.6g}); rebuild it with sae-jax dashboard")


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_bundle(run_dir, out_dir, *, data_dir=None, accelerator: str = DEFAULT_ACCELERATOR,
                 audit: str | None = None, n_contexts: int = 64, seed: int = 0,
                 fidelity_sequences: int = 32, corpus=None, batch_size: int = 4096,
                 progress: bool = False, log=None) -> dict:
    """Writes the bundle of `run_dir`'s latest checkpoint to `out_dir` (module docstring).

    Args:
      data_dir: the run's harvested store (default: the one it trained on).
      accelerator: what `bill.json`'s chip-hours are estimated for (`sae-jax cost` names).
      audit: None (include RUN/audit/audit.json if any), "run" or "skip".
      n_contexts, seed: top activations sampled into contexts.npz.
      fidelity_sequences, corpus: for the eval, when it has to be run.

    Returns:
      `{"bundle", "manifest_sha256", "n_files", "files", "model_sha256", "n_contexts",
      "bill", "seconds"}`. `manifest_sha256` is the bundle's fingerprint: the manifest pins
      every other file, so publishing this one hash pins the whole bundle.
    """
    import sae_jax
    from sae_jax.data.store import open_store
    from sae_jax.rundir import read_run
    from sae_jax.saelens.export import export_saelens
    from sae_jax.saelens.format import CATALOG_FILE as EXPORT_CATALOG

    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    out = Path(out_dir)
    if n_contexts < 1:
        raise UserError(f"--contexts must be at least 1, got {n_contexts}")
    _check_out(out)
    run = read_run(run_dir)
    data_dir = str(data_dir) if data_dir is not None else run.data_dir
    store = open_store(data_dir)
    if run.store_id is not None and store.id is not None and run.store_id != store.id:
        raise UserError(f"run {run_dir} was trained on store {run.store_id}, but {data_dir} "
                        f"is store {store.id}; give the store it was trained on")
    sae = sae_jax.load(run_dir)
    prov = provenance(run, sae, store)  # refuses a store no model can be re-run for
    catalog = _catalog(run_dir, sae, data_dir, batch_size, progress, log)
    evaluation = _eval_report(run_dir, sae, data_dir, fidelity_sequences, corpus, log)
    audit_report = _audit_report(run_dir, data_dir, audit, corpus, log)
    contexts = build_contexts(store, catalog, n_contexts, seed)
    if len(contexts["value"]) == 0:
        raise UserError("the catalog has no top activation whose whole sequence the store "
                        "holds; contexts.npz would be empty")
    _check_recorded(sae, store, contexts)
    costs = bill(run_dir, sae, accelerator)

    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        export_saelens(run_dir, tmp / names.SAE_DIR, step=sae.step)
        (tmp / names.SAE_DIR / EXPORT_CATALOG).unlink(missing_ok=True)  # one catalog: ours
        texts = {names.CATALOG: catalog.to_json(),
                 names.EVAL: files.strict_json(evaluation, indent=1),
                 names.PROVENANCE: files.strict_json(prov, indent=1),
                 names.BILL: files.strict_json(costs, indent=1)}
        if audit_report is not None:
            texts[names.AUDIT] = files.strict_json(audit_report)
        for rel in EVALS_FILES:
            found = files.read_text(files.join(str(run_dir), rel))
            if found is not None:
                texts[names.EVALS] = found
                break
        for rel, text in texts.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text if text.endswith("\n") else text + "\n")
        (tmp / names.CONTEXTS).write_bytes(_npz_bytes(contexts))
        listed = names.write_manifest(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once it became OUT
    return {"bundle": str(out.absolute()),
            "manifest_sha256": names.file_sha256(out / names.MANIFEST),
            "n_files": len(listed["files"]),
            "files": sorted(listed["files"]), "model_sha256": prov["model"]["sha256"],
            "n_contexts": int(len(contexts["value"])), "bill": costs,
            "seconds": round(time.perf_counter() - t0, 3)}


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a trained run")
    parser.add_argument("out_dir", help="the new bundle folder (must not exist, or be empty)")
    parser.add_argument("--data", dest="data_dir", metavar="DATA",
                        help="the run's harvested store (default: the one it trained on)")
    parser.add_argument("--accelerator", default=DEFAULT_ACCELERATOR, metavar="NAME",
                        help="the chip-hours of bill.json are for this (default %(default)s)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--audit", dest="audit", action="store_const", const="run",
                       help="run sae-jax audit (default: include RUN/audit/audit.json if any)")
    which.add_argument("--no-audit", dest="audit", action="store_const", const="skip",
                       help="no audit report, even if the run has one")
    parser.add_argument("--contexts", type=int, default=64, dest="n_contexts", metavar="N",
                        help="top activations sampled into contexts.npz (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="picks the contexts (default 0)")
    parser.add_argument("--fidelity-sequences", type=int, default=32, metavar="N",
                        help="held-out sequences for the eval's fidelity, if the eval is run")
    parser.add_argument("--corpus", nargs="+", metavar="PATH",
                        help="the corpus the store was harvested from, if not the default")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> dict:
    def log(msg):
        print(f"sae-jax: bundle: {msg}", file=sys.stderr)

    return write_bundle(args.run_dir, args.out_dir, data_dir=args.data_dir,
                        accelerator=args.accelerator, audit=args.audit,
                        n_contexts=args.n_contexts, seed=args.seed,
                        fidelity_sequences=args.fidelity_sequences, corpus=args.corpus,
                        progress=not args.quiet, log=log)
