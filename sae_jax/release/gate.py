"""`sae-jax gate BUNDLE --policy policy.toml [--baseline PREVIOUS_BUNDLE] [--crosscoder RUN]`:
ship or not.

A release pipeline calls it on a bundle (`sae-jax bundle`) and a policy (`release.policy`):

1. **Manifest.** Every file of the bundle is checked against `manifest.json` first
   (`release.manifest.verify_manifest`); a bundle with any problem fails, and nothing in it is
   read.
2. **Thresholds.** Each threshold the policy sets becomes one check on the bundle's reports
   (`reports/eval.json`, `reports/audit.json`). A metric the bundle lacks fails with reason
   "not measured": a gate must never pass because a number is missing; `allow_missing =
   true` turns such checks into "skipped".
3. **Drift.** With `--baseline` (the previous release's bundle, its manifest checked too),
   the two SAEs (`sae/`, SAELens folders) are matched by decoder direction as `sae-jax
   compare` does (`compare.compare_saes`): PW-MCC is the mean one-to-one decoder cosine
   (`matched_cosine_mean`), and the baseline features that vanished and the new ones that
   appeared (best cosine < `drift_threshold`) are listed for review. Without
   `min_drift_pwmcc` the comparison is reported but decides nothing.
4. **Model diff.** With `--crosscoder RUN` (a crosscoder trained on the baseline model's and
   this model's activations of the same tokens, in that source order), `sae-jax diff`
   classes its latents; `max_diff_exclusive_frac` bounds the fraction of exclusive (A-only +
   B-only) latents and `diff_shared_latents` lists latents that must stay shared. Separate
   SAEs differ by training noise alone (seed-to-seed PW-MCC ~0.3-0.4); a crosscoder's
   shared latents are matched by construction, so what it calls exclusive is the change.

Prints a pass/fail table with reasons (stderr), writes `gate.json` and `gate.md` to `--out`
(default `BUNDLE/../gate-<bundle name>`; never inside a bundle, whose manifest would then
fail), and exits 0 (pass) or 1 (fail); usage errors exit 2. The last stdout line is JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from sae_jax import files
from sae_jax.errors import Failed, UserError
from sae_jax.release.gate_report import fmt_value, format_table, markdown
from sae_jax.release.manifest import MANIFEST, read_manifest, verify_manifest
from sae_jax.release.policy import Policy, read_policy

PASS, FAIL, SKIPPED, INFO = "pass", "fail", "skipped", "info"
NOT_MEASURED = "not measured"
EVAL, AUDIT = "reports/eval.json", "reports/audit.json"
SAE_DIR, CATALOG = "sae", "catalog.json"
GATE_JSON, GATE_MD = "gate.json", "gate.md"
N_LISTED = 20  # vanished / appeared features listed with their labels in gate.md


# ----------------------------------------------------------------------------------------
# Reading a bundle


def read_report(bundle: Path, rel: str) -> dict | None:
    """A JSON report of the bundle, or None if the bundle has none (not measured)."""
    path = bundle / rel
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object")
    return value


def lookup(report: dict | None, *keys: str) -> float | None:
    """`report[k1][k2]...` as a float, or None where a level is missing or not a number."""
    v = report
    for k in keys:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    ok = isinstance(v, int | float) and not isinstance(v, bool) and v == v
    return float(v) if ok else None


def poisoning_flags(audit: dict | None) -> list[int] | None:
    """Ids of the latents the audit's poisoning detector flagged, or None when it was not run.
    Reads `sae_jax.analysis.poisoning`'s report (`flagged_features`: every flagged id; its
    `flagged` details stop at 50), or a plain list of flags (an id or a dict with `id`)."""
    raw = None if audit is None else audit.get("poisoning")
    if raw is None:
        return None
    if isinstance(raw, dict):
        flags = raw.get("flagged_features", raw.get("flagged"))
    else:
        flags = raw
    if not isinstance(flags, list):
        raise UserError(f"{AUDIT}: `poisoning` holds no list of flagged latents")
    ids = [f.get("id", f.get("feature")) if isinstance(f, dict) else f for f in flags]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{AUDIT}: a poisoning flag without an integer feature id")
    return ids


# ----------------------------------------------------------------------------------------
# Checks


def row(check: str, metric: str, value, op: str | None, threshold, status: str,
        reason: str) -> dict:
    """One line of the gate's table."""
    return {"check": check, "metric": metric, "value": value, "op": op,
            "threshold": threshold, "status": status, "reason": reason}


def threshold_row(check: str, metric: str, value: float | None, op: str, threshold: float,
                  policy: Policy, why_missing: str = "") -> dict:
    """Compares `value` with a `>=` or `<=` threshold; a missing value fails (or is skipped
    with `allow_missing`)."""
    if value is None:
        reason = NOT_MEASURED + (f" ({why_missing})" if why_missing else "")
        if policy.allow_missing:
            return row(check, metric, None, op, threshold, SKIPPED,
                       reason + "; allowed by allow_missing")
        return row(check, metric, None, op, threshold, FAIL, reason)
    ok = value >= threshold if op == ">=" else value <= threshold
    word = {(">=", True): "at least", (">=", False): "below", ("<=", True): "at most",
            ("<=", False): "above"}[op, ok]
    return row(check, metric, value, op, threshold, PASS if ok else FAIL,
               f"{fmt_value(value)} is {word} {threshold:g}")


def metric_checks(policy: Policy, ev: dict | None, audit: dict | None) -> list[dict]:
    """The threshold checks on eval.json and audit.json that the policy sets."""
    no_eval = "" if ev is not None else f"the bundle has no {EVAL}"
    no_audit = "" if audit is not None else f"the bundle has no {AUDIT}"
    rows = []
    if policy.min_fidelity is not None:
        rows.append(threshold_row("fidelity", f"{EVAL} fidelity.fidelity_recovered",
                                  lookup(ev, "fidelity", "fidelity_recovered"), ">=",
                                  policy.min_fidelity, policy, no_eval))
    if policy.min_loss_recovered is not None:
        rows.append(threshold_row("loss_recovered", f"{EVAL} loss_recovered",
                                  lookup(ev, "loss_recovered"), ">=",
                                  policy.min_loss_recovered, policy, no_eval))
    if policy.max_dead_frac is not None:
        rows.append(threshold_row("dead_frac", f"{EVAL} dead_frac", lookup(ev, "dead_frac"),
                                  "<=", policy.max_dead_frac, policy, no_eval))
    if policy.max_dark_matter is not None:
        rows.append(threshold_row("dark_matter", f"{AUDIT} coverage.fvu",
                                  lookup(audit, "coverage", "fvu"), "<=",
                                  policy.max_dark_matter, policy, no_audit))
    margin = policy.min_faithfulness_auc_margin
    least = policy.min_faithfulness_auc if margin is None else margin
    if least is not None:
        for score in policy.faithfulness_scores:
            auc = lookup(audit, "summary", score, "auc")
            value = auc if margin is None or auc is None else round(auc - 0.5, 12)
            name = f"faithfulness_auc{'_margin' if margin is not None else ''}[{score}]"
            metric = f"{AUDIT} summary.{score}.auc" + (" - 0.5" if margin is not None else "")
            rows.append(threshold_row(name, metric, value, ">=", least, policy, no_audit))
    return rows


def poisoning_check(policy: Policy, audit: dict | None) -> dict | None:
    """Flags not in `acknowledged_features` against `max_poisoning_flags`."""
    if not policy.checks_poisoning:
        return None
    metric, limit = f"{AUDIT} poisoning", policy.poisoning_limit
    try:
        flags = poisoning_flags(audit)
    except UserError as e:
        return row("poisoning", metric, None, "<=", limit, FAIL, str(e))
    why = (f"the bundle has no {AUDIT}" if audit is None else
           "the audit has no `poisoning` key: the poisoning detector was not run")
    if flags is None:
        return threshold_row("poisoning", metric, None, "<=", limit, policy, why)
    acked = set(policy.acknowledged_features)
    open_flags = sorted(set(flags) - acked)
    out = threshold_row("poisoning", metric, len(open_flags), "<=", limit, policy)
    out["reason"] = (f"{len(open_flags)} unacknowledged flag(s)"
                     + (f" {open_flags[:10]}" if open_flags else "")
                     + f", {len(set(flags) & acked)} acknowledged; limit {limit}")
    return out


def drift_check(policy: Policy, bundle: Path, baseline: Path | None) -> tuple[dict | None,
                                                                              dict | None]:
    """PW-MCC of the bundle's SAE against the baseline's, and the features to review."""
    from sae_jax.analysis.catalog import catalog_index
    from sae_jax.analysis.compare import compare_saes
    from sae_jax.saelens.import_sae import load_saelens

    least = policy.min_drift_pwmcc
    metric = "mean one-to-one decoder cosine vs --baseline"
    if baseline is None:
        if least is None:
            return None, None
        return threshold_row("drift_pwmcc", metric, None, ">=", least, policy,
                             "no --baseline bundle given"), None
    status_if_bad = FAIL if least is not None else INFO
    problems = _manifest_problems(baseline)
    if problems:
        return row("drift_pwmcc", metric, None, ">=", least, status_if_bad,
                   f"the baseline bundle fails its manifest: {_brief(problems)}"), None
    try:
        result = compare_saes(load_saelens(baseline / SAE_DIR), load_saelens(bundle / SAE_DIR),
                              threshold=policy.drift_threshold, n_examples=N_LISTED,
                              catalog_a=catalog_index(baseline / CATALOG),
                              catalog_b=catalog_index(bundle / CATALOG))
    except UserError as e:
        return row("drift_pwmcc", metric, None, ">=", least, status_if_bad, str(e)), None
    cat = result["per_feature"]
    details = {k: result[k] for k in ("width_a", "width_b", "threshold", "n_matched",
                                      "matched_frac_a", "matched_frac_b",
                                      "matched_cosine_median", "counts")}
    details.update(pwmcc=result["matched_cosine_mean"],
                   vanished=[int(i) for i, c in enumerate(cat["a"]["category"])
                             if c == "vanished"],
                   appeared=[int(i) for i, c in enumerate(cat["b"]["category"])
                             if c == "appeared"],
                   examples=result["examples"])
    details = files.json_safe(details)
    pw = details["pwmcc"]
    review = (f"; {len(details['vanished'])} vanished, {len(details['appeared'])} appeared "
              f"(cos < {policy.drift_threshold:g})")
    if least is None:
        return row("drift_pwmcc", metric, pw, None, None, INFO,
                   f"PW-MCC {pw:.4g} (no min_drift_pwmcc set){review}"), details
    out = threshold_row("drift_pwmcc", metric, pw, ">=", least, policy)
    out["reason"] += review
    return out, details


DIFF_EXCLUSIVE = "(A-only + B-only) / non-empty latents of --crosscoder"
DIFF_SHARED = "class of each diff_shared_latents latent in --crosscoder"


def diff_check(policy: Policy, crosscoder: Path | None) -> tuple[list[dict], dict | None]:
    """The crosscoder diff's rows (module docstring, 4.) and its details for gate.json."""
    from sae_jax.analysis.diff import diff_run

    wanted = [(DIFF_EXCLUSIVE, "diff_exclusive", policy.max_diff_exclusive_frac)] * (
        policy.max_diff_exclusive_frac is not None) + [
        (DIFF_SHARED, "diff_shared", 0)] * bool(policy.diff_shared_latents)
    if crosscoder is None:
        return [threshold_row(name, metric, None, "<=", limit, policy,
                              "no --crosscoder run given") for metric, name, limit in wanted], None
    try:
        result = diff_run(str(crosscoder))
    except UserError as e:
        return [row(name, metric, None, "<=", limit, FAIL, str(e))
                for metric, name, limit in wanted] or [
            row("diff", DIFF_EXCLUSIVE, None, None, None, INFO, str(e))], None
    c, a, b = result["counts"], result["source_a"], result["source_b"]
    frac = (c["A-only"] + c["B-only"]) / max(result["width"] - c["empty"], 1)
    summary = (f"{c['A-only']} {a}-only, {c['shared']} shared, {c['B-only']} {b}-only, "
               f"{c['mixed']} mixed, {c['empty']} empty of {result['width']}")
    cls = {i: k for k, ids in result["latents"].items() for i in ids}
    not_shared = {i: cls.get(i, "no such latent") for i in policy.diff_shared_latents
                  if cls.get(i) != "shared"}
    details = {"run": str(crosscoder), **{k: result[k] for k in (
        "source_a", "source_b", "width", "thresholds", "counts", "median_shared_cosine")},
        "exclusive_frac": frac, "a_only": result["latents"]["A-only"],
        "b_only": result["latents"]["B-only"],
        "listed_not_shared": [[i, k] for i, k in not_shared.items()]}
    rows = []
    for metric, name, limit in wanted:
        if name == "diff_exclusive":
            out = threshold_row(name, metric, frac, "<=", limit, policy)
            out["reason"] += f"; {summary}"
        else:
            out = threshold_row(name, metric, len(not_shared), "<=", 0, policy)
            listed = ", ".join(f"{i} ({k})" for i, k in list(not_shared.items())[:10])
            out["reason"] = (f"{len(not_shared)} of {len(policy.diff_shared_latents)} listed "
                             "latent(s) not shared" + (f": {listed}" if listed else ""))
        rows.append(out)
    if not rows:
        rows = [row("diff_exclusive", DIFF_EXCLUSIVE, frac, None, None, INFO,
                    f"{summary} (no diff threshold set)")]
    return rows, files.json_safe(details)


def _manifest_problems(bundle: Path) -> list[str]:
    try:
        return verify_manifest(bundle)
    except UserError as e:
        return [str(e)]


def _brief(problems: list[str], n: int = 3) -> str:
    more = f" (+{len(problems) - n} more)" if len(problems) > n else ""
    return "; ".join(problems[:n]) + more


def gate(bundle, policy: Policy, baseline=None, crosscoder=None) -> dict:
    """Runs every check of the policy on a bundle (module docstring); returns the result
    (`passed`, `checks`, `drift`, `diff`, ...), which `gate.json` holds."""
    bundle = Path(bundle)
    baseline = None if baseline is None else Path(baseline)
    crosscoder = None if crosscoder is None else Path(crosscoder)
    problems = _manifest_problems(bundle)
    checks = [row("manifest", MANIFEST, None, None, None, FAIL if problems else PASS,
                  _brief(problems) if problems else "every file matches its SHA-256")]
    drift, diff, info = None, None, {}
    if not problems:
        manifest = read_manifest(bundle)
        checks[0]["value"] = len(manifest["files"])
        info = {"created": manifest.get("created"), "provenance": _provenance(bundle)}
        try:
            ev, audit = read_report(bundle, EVAL), read_report(bundle, AUDIT)
        except UserError as e:
            checks.append(row("reports", "reports/*.json", None, None, None, FAIL, str(e)))
            ev = audit = None
        else:
            checks += metric_checks(policy, ev, audit)
            checks.append(poisoning_check(policy, audit))
            drift_row, drift = drift_check(policy, bundle, baseline)
            checks.append(drift_row)
            diff_rows, diff = diff_check(policy, crosscoder)
            checks += diff_rows
    checks = [c for c in checks if c is not None]
    failed = [c["check"] for c in checks if c["status"] == FAIL]
    return {"passed": not failed, "verdict": "pass" if not failed else "fail",
            "bundle": str(bundle), "baseline": None if baseline is None else str(baseline),
            "failed": failed, "checks": checks, "manifest_problems": problems,
            "drift": drift, "crosscoder": None if crosscoder is None else str(crosscoder),
            "diff": diff, "policy": asdict(policy), **info}


def _provenance(bundle: Path) -> dict | None:
    """Model, layer and site from provenance.json, for the report's header (best effort)."""
    try:
        prov = read_report(bundle, "provenance.json")
    except UserError:
        return None
    if prov is None:
        return None
    model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
    return {"model": model.get("name"), "layer": prov.get("layer"), "site": prov.get("site")}


# ----------------------------------------------------------------------------------------
# Command line


def out_dir_for(bundle: Path, out: str | None, baseline: Path | None) -> Path:
    """`--out`, or `BUNDLE/../gate-<name>`; refused inside either bundle (its manifest would
    fail) or where a file stands."""
    path = Path(out) if out else bundle.absolute().parent / f"gate-{bundle.absolute().name}"
    resolved = path.resolve()
    for b in (bundle, baseline):
        if b is not None and (resolved == b.resolve() or b.resolve() in resolved.parents):
            raise UserError(f"--out {path} lies inside the bundle {b}: writing there would "
                            "break its manifest; give a directory outside it")
    for p in (resolved, *resolved.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"--out {path}: {p} is a file, not a directory")
            break
    return path


def add_arguments(parser) -> None:
    """`sae-jax gate BUNDLE --policy policy.toml [--baseline BUNDLE] [--crosscoder RUN]
    [--out DIR]`."""
    parser.add_argument("bundle", help="the bundle to gate (`sae-jax bundle`)")
    parser.add_argument("--policy", required=True, metavar="TOML",
                        help="thresholds (see docs/release-gate.md)")
    parser.add_argument("--baseline", metavar="BUNDLE",
                        help="the previous release's bundle, for drift (PW-MCC)")
    parser.add_argument("--crosscoder", metavar="RUN",
                        help="a crosscoder run on the baseline's and this model's activations "
                             "(sources in that order), for the model-diff checks")
    parser.add_argument("--out", metavar="DIR",
                        help="where gate.json and gate.md go (default: BUNDLE/../gate-<name>)")


def run(args) -> dict:
    """Runs the gate; exits 1 (after printing the JSON line) when a check fails."""
    bundle = Path(args.bundle)
    baseline = None if args.baseline is None else Path(args.baseline)
    for b, what in ((bundle, "BUNDLE"), (baseline, "--baseline")):
        if b is not None and not b.is_dir():
            raise UserError(f"{what} {b} is not a directory (a bundle from `sae-jax bundle`)")
    if args.crosscoder is not None and not Path(args.crosscoder).is_dir():
        raise UserError(f"--crosscoder {args.crosscoder} is not a directory (a crosscoder run "
                        "from `sae-jax train DATA RUN arch=crosscoder`)")
    policy = read_policy(args.policy)
    out = out_dir_for(bundle, args.out, baseline)
    result = {**gate(bundle, policy, baseline, args.crosscoder),
              "policy_file": str(args.policy)}
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / GATE_JSON), "md": str(out / GATE_MD)}
    result["out"] = paths
    files.write_text(paths["json"], files.strict_json(result, indent=1) + "\n")
    files.write_text(paths["md"], markdown(result))
    print(format_table(result), file=sys.stderr)
    line = {k: result[k] for k in ("passed", "verdict", "bundle", "baseline", "failed", "out")}
    line["checks"] = [{k: c[k] for k in ("check", "value", "status", "reason")}
                      for c in result["checks"]]
    if not result["passed"]:
        raise Failed(f"the gate fails: {', '.join(result['failed'])}", line)
    return line
