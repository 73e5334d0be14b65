"""`sae-jax verify BUNDLE [--model PATH] [--data DATA]`: is this bundle what it says it is?

Checks, each reported as one `PASS name: ...` / `FAIL name: ...` line on stderr:

* **manifest**: manifest.json is a `sae-jax-bundle/1` manifest;
* **files**: no listed file is missing and no file is unlisted;
* **hashes**: every listed file has its recorded size and SHA-256;
* **json**: provenance.json, bill.json, catalog.json and reports/*.json parse as strict JSON
  (no NaN, no duplicate keys) and hold their required keys;
* **sae**: the SAELens export in sae/ loads, with the catalog's width and provenance's d_in;
* **contexts**: contexts.npz loads without pickle, and every recorded value equals the
  catalog's value of that (feature, row) top example, exactly in float32;

with `--model PATH` (a causal LM's Hugging Face folder, a MiniLM folder, or `minilm`):

* **model_hash**: the SHA-256 of each of its weight files equals provenance's;
* **rederive**: the model and the bundle's SAE, re-run on `--samples` contexts (seeded),
  fire each feature at its recorded value (|got − value| ≤ 1e-4 + 1e-3·|value|, float32);
  a swapped SAE, an edited catalog (with contexts.npz edited to match) or another model fail;

with `--data DATA`:

* **data**: the store's id and the SHA-256 of its token ids and positions equal provenance's;

with `--expect SHA256`:

* **fingerprint**: manifest.json's own SHA-256 is the one the producer published.

The hashes make a bundle consistent with its own manifest; whoever can rewrite the manifest
can rewrite any file whose content nothing re-derives (bill, provenance text, eval numbers).
So the result also gives `manifest_sha256`, the bundle's fingerprint: compare it with the one
the producer published (`sae-jax bundle` prints it; `--expect`) to know it is *their* bundle.

The last stdout line is JSON `{"bundle", "manifest_sha256", "ok", "checks": [{"name", "ok",
"detail"}], "failed"}`. Exit status 0 when every check passes, 1 when any fails (after that
JSON line), 2 for a usage error (no such bundle, model or store folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sae_jax import files
from sae_jax.errors import Failed, UserError
from sae_jax.release import contexts as ctx
from sae_jax.release import manifest as names

REQUIRED = {
    names.PROVENANCE: ("model", "layer", "corpus", "n_tokens", "training_config",
                       "code_version", "store_id"),
    names.BILL: ("steps", "tokens", "wall_seconds", "chip_hours", "accelerator", "formula"),
    names.CATALOG: ("header", "features"),
    names.EVAL: ("fvu", "l0", "dead_frac"),
}


class Checks:
    """The ordered results of a verification: `add(name, ok, detail)`."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.items.append({"name": name, "ok": bool(ok), "detail": detail})
        return ok

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.items if not c["ok"]]


def _summary(lines: list[str], n: int = 3) -> str:
    more = f" (+{len(lines) - n} more)" if len(lines) > n else ""
    return "; ".join(lines[:n]) + more


def _read_json(root: Path, rel: str):
    try:
        text = (root / rel).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{rel}: cannot read ({e})") from None
    return names.strict_loads(text, rel)


def _check_json(root: Path, checks: Checks, listed: set[str]) -> dict:
    """Parses the bundle's JSON files strictly; returns those that parsed."""
    parsed, bad = {}, []
    wanted = [*REQUIRED, *(r for r in (names.AUDIT, names.EVALS) if r in listed)]
    for rel in wanted:
        try:
            value = _read_json(root, rel)
        except ValueError as e:
            bad.append(str(e))
            continue
        missing = [k for k in REQUIRED.get(rel, ()) if not isinstance(value, dict)
                   or k not in value]
        if not isinstance(value, dict) or missing:
            bad.append(f"{rel}: missing {', '.join(missing) or 'an object'}")
            continue
        parsed[rel] = value
    checks.add("json", not bad, _summary(bad) if bad else f"{len(wanted)} files parse")
    return parsed


def _check_sae(root: Path, checks: Checks, parsed: dict):
    from sae_jax.saelens.import_sae import load_saelens

    try:
        sae = load_saelens(root / names.SAE_DIR)
    except (UserError, OSError, ValueError) as e:
        checks.add("sae", False, f"the SAELens export does not load: {e}")
        return None
    header = (parsed.get(names.CATALOG) or {}).get("header") or {}
    d_in = (parsed.get(names.PROVENANCE) or {}).get("d_in")
    wrong = [f"{what} {want}, SAE has {got}" for what, want, got in (
        ("catalog width", header.get("width"), sae.width), ("provenance d_in", d_in, sae.d_in))
        if want is not None and want != got]
    checks.add("sae", not wrong, "; ".join(wrong) or f"{sae.config.arch}, width {sae.width}, "
               f"d_in {sae.d_in}")
    return sae


def _check_contexts(root: Path, checks: Checks, parsed: dict):
    from sae_jax.analysis.catalog import FeatureCatalog

    try:
        arrays = ctx.read_contexts(root / names.CONTEXTS)
    except ValueError as e:
        checks.add("contexts", False, str(e))
        return None
    raw = parsed.get(names.CATALOG)
    if raw is None:
        checks.add("contexts", False, "no readable catalog to check them against")
        return arrays
    bad = ctx.against_catalog(arrays, FeatureCatalog(raw["header"], raw["features"]))
    checks.add("contexts", not bad, _summary(bad) if bad else
               f"{len(arrays['value'])} recorded values agree with the catalog")
    return arrays


def _activations_fn(model: str, prov: dict):
    """`activations_fn(ids, mask)` of `model` at the bundle's hook (the kind of model the
    provenance names). Raises UserError when the folder is not such a model."""
    from sae_jax.lm import harvest_models

    layer, pair, kind = int(prov["layer"]), prov.get("pair"), prov["model"]["kind"]
    if kind == "minilm":
        from sae_jax.lm import minilm
        from sae_jax.lm.hooks import minilm_activations

        params = minilm.load_params(None if model == "minilm" else model)
        return (minilm_activations(layer, params) if pair is None else
                harvest_models.minilm_pair_activations(layer, pair, params))
    if model == "minilm":
        raise UserError(f"the bundle's model is the causal LM {prov['model'].get('name')!r}, "
                        "not MiniLM")
    from sae_jax.lm import causal

    m = causal.load(model, dtype=prov["model"].get("dtype"))
    return harvest_models.causal_activations(m, layer, pair or prov.get("site") or "resid")


def _check_model(model: str, checks: Checks, prov, sae, arrays, samples: int,
                 seed: int) -> None:
    from sae_jax.data.store import STORE_DTYPES
    from sae_jax.release.provenance import model_sha256

    record = prov.get("model") if isinstance(prov, dict) else None
    if not (isinstance(record, dict) and record.get("kind") in ("minilm", "causal")
            and isinstance(record.get("sha256"), dict) and isinstance(prov.get("layer"), int)):
        why = "provenance.json is unreadable or lacks model kind, sha256 or layer"
        checks.add("model_hash", False, why)
        checks.add("rederive", False, why)
        return
    try:
        found, want = model_sha256(model), record["sha256"]
        differ = sorted(k for k in set(found) | set(want) if found.get(k) != want.get(k))
        checks.add("model_hash", not differ, "weight files match provenance" if not differ
                   else f"{model}: weight file(s) {', '.join(differ)} missing or with another "
                   f"SHA-256 than provenance records ({len(want)} recorded, {len(found)} "
                   "found)")
    except UserError as e:
        checks.add("model_hash", False, f"cannot hash {model}: {e}")
    if sae is None or arrays is None:
        checks.add("rederive", False, "needs a loadable SAE and contexts.npz")
        return
    try:
        fn = _activations_fn(model, prov)
    except UserError as e:
        checks.add("rederive", False, f"cannot run {model} as the bundle's model: {e}")
        return
    n = len(arrays["value"])
    if n == 0:
        checks.add("rederive", False, "contexts.npz holds no contexts to re-derive")
        return
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(samples, n), replace=False))
    sample = {k: v[pick] for k, v in arrays.items()}
    dtype = STORE_DTYPES.get(prov.get("activation_dtype"), np.float32)
    try:
        _, bad = ctx.rederive(sample, fn, sae, dtype)
    except (UserError, ValueError, TypeError, IndexError) as e:  # widths that disagree, ...
        checks.add("rederive", False, f"{model} cannot run the contexts: {e}")
        return
    checks.add("rederive", not bad, f"{len(bad)} of {len(pick)} off: {_summary(bad)}" if bad
               else f"{len(pick)} of {len(pick)} fire at the recorded value (rel "
               f"{ctx.RTOL:g} + abs {ctx.ATOL:g})")


def _check_data(data: str, checks: Checks, prov: dict | None) -> None:
    from sae_jax.data.store import open_store
    from sae_jax.release.provenance import corpus_sha256

    if prov is None:
        checks.add("data", False, "provenance.json is unreadable")
        return
    store = open_store(data)
    wrong = []
    if store.id != prov.get("store_id"):
        wrong.append(f"store id {store.id} != provenance's {prov.get('store_id')}")
    try:
        corpus = prov.get("corpus") if isinstance(prov.get("corpus"), dict) else {}
        if corpus_sha256(store) != corpus.get("sha256"):
            wrong.append("token ids/positions hash differs from provenance's corpus sha256")
    except UserError as e:
        wrong.append(str(e))
    checks.add("data", not wrong, "; ".join(wrong) or "store id and corpus hash match")


def verify_bundle(bundle, model: str | None = None, data: str | None = None,
                  samples: int = 32, seed: int = 0, expect: str | None = None) -> dict:
    """Every check of the module docstring on the bundle folder (`expect`: the published
    manifest SHA-256, checked as **fingerprint**); returns `{"bundle", "manifest_sha256",
    "ok", "checks", "failed"}`. Raises UserError only for usage errors."""
    root = Path(bundle)
    if not root.is_dir():
        raise UserError(f"no bundle folder at {bundle}")
    if model is not None and model != "minilm" and not Path(model).is_dir():
        raise UserError(f"--model {model}: no such folder (give a model folder or minilm)")
    if data is not None and not files.is_remote(data) and not Path(data).is_dir():
        raise UserError(f"--data {data}: no such store folder")
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    checks = Checks()
    listed: set[str] = set()
    try:
        manifest = names.read_manifest(root)
        listed = set(manifest["files"])
        checks.add("manifest", True, f"{len(listed)} files listed")
        layout, changed = names.compare_files(root, manifest)
        checks.add("files", not layout, _summary(layout) if layout else "none missing or extra")
        checks.add("hashes", not changed, _summary(changed) if changed else
                   f"{len(listed) - len(layout)} files match")
    except ValueError as e:
        checks.add("manifest", False, str(e))
    parsed = _check_json(root, checks, listed)
    sae = _check_sae(root, checks, parsed)
    arrays = _check_contexts(root, checks, parsed)
    prov = parsed.get(names.PROVENANCE)
    if model is not None:
        _check_model(model, checks, prov, sae, arrays, samples, seed)
    if data is not None:
        _check_data(data, checks, prov)
    fingerprint = (names.file_sha256(root / names.MANIFEST)
                   if (root / names.MANIFEST).is_file() else None)
    if expect is not None:
        same = fingerprint == expect.strip().lower()
        checks.add("fingerprint", same, "manifest SHA-256 is the one expected" if same else
                   f"manifest SHA-256 {fingerprint} is not the expected {expect}")
    return {"bundle": str(root.absolute()), "manifest_sha256": fingerprint,
            "ok": not checks.failed, "checks": checks.items, "failed": checks.failed}


def add_arguments(parser) -> None:
    parser.add_argument("bundle", help="a folder written by sae-jax bundle")
    parser.add_argument("--model", metavar="PATH",
                        help="re-derive activations with this model: a Hugging Face folder, "
                             "or minilm")
    parser.add_argument("--data", metavar="DATA", help="check the store's id and corpus hash too")
    parser.add_argument("--samples", type=int, default=32, metavar="N",
                        help="contexts re-derived with --model (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="picks the sampled contexts")
    parser.add_argument("--expect", metavar="SHA256",
                        help="the manifest SHA-256 the producer published (bundle prints it)")


def run(args) -> dict:
    result = verify_bundle(args.bundle, args.model, args.data, args.samples, args.seed,
                           args.expect)
    for c in result["checks"]:
        print(f"{'PASS' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}", file=sys.stderr)
    if not result["ok"]:
        raise Failed(f"{len(result['failed'])} check(s) failed: {', '.join(result['failed'])}",
                     result)
    return result
