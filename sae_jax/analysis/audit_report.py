"""The audit report: where `sae-jax audit` writes it, what it summarises, how it is read.

`RUN/audit/audit.json` holds the settings, the summary (per score: the median of the trained
and of the random-control features, and the AUC separating them), histograms, best/worst
features, every scored feature of both SAEs, and coverage. Both the audit (which writes it)
and the dashboard (which shows it) import this module, and neither imports the other's
constants.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sae_jax import files
from sae_jax.analysis.catalog import write_catalog
from sae_jax.analysis.faithfulness import auc
from sae_jax.errors import UserError

AUDIT_DIR = "audit"
AUDIT_FILE = "audit.json"
SCORES = ("causal", "ablation_r", "explanatory", "f1")
SUMMARY_SCORES = SCORES + ("steer_winrate", "precision", "recall")
SCORE_RANGES = {"causal": (-5.0, 15.0), "ablation_r": (0.9, 1.0), "explanatory": (-0.2, 1.0),
                "f1": (0.0, 1.0)}  # histogram ranges; values outside go to the end bins
N_LISTED = 10


def rounded(v):
    """A score as stored: a float with 5 significant digits (other values as they are)."""
    return float(f"{v:.5g}") if isinstance(v, float) else v


def _median(records: list[dict], key: str) -> float | None:
    v = [r[key] for r in records if r.get(key) is not None]
    return float(np.median(v)) if v else None


def _margin(real: float | None, random: float | None) -> float | None:
    return None if real is None or random is None else real - random


def summarize(real: list[dict], control: list[dict]) -> dict:
    """Median of every score for both SAEs, the trained SAE's `margin` over the random
    control (median − median_random; every score is higher-is-better, so positive = the
    trained SAE is better, as `baselines.margins` signs it) and the AUC separating them
    (`faithfulness.auc`)."""
    summary = {}
    for key in SUMMARY_SCORES:
        median, median_random = _median(real, key), _median(control, key)
        summary[key] = {"median": rounded(median), "median_random": rounded(median_random),
                        "margin": rounded(_margin(median, median_random)),
                        "auc": rounded(auc([r.get(key) for r in real],
                                           [r.get(key) for r in control]))}
    return summary


def ranked(records: list[dict], key: str, n: int = N_LISTED) -> dict:
    """The `n` best and worst features by `key` (None scores left out)."""
    have = sorted((r for r in records if r.get(key) is not None), key=lambda r: (r[key], r["id"]))
    brief = [{"id": r["id"], "label": r["label"], key: r[key]} for r in have]
    return {"best": brief[::-1][:n], "worst": brief[:n]}


def write_report(report: dict, catalog, run_dir) -> str:
    """Writes `RUN/audit/audit.json` and the audited catalog; returns the JSON's path."""
    out = files.join(str(run_dir), AUDIT_DIR)
    if not files.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    path = files.join(out, AUDIT_FILE)
    files.write_text(path, json.dumps(report, allow_nan=False, ensure_ascii=False))
    write_catalog(catalog, out)
    return path


def read_audit(run_dir: str | os.PathLike) -> dict | None:
    """The run's audit report (`RUN_DIR/audit/audit.json`), or None if it has none."""
    text = files.read_text(files.join(str(run_dir), AUDIT_DIR, AUDIT_FILE))
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"the audit report of {run_dir} is damaged: {e}") from None


def summary_of(report: dict) -> dict:
    """The command's result line: medians, separation from random, coverage numbers."""
    s, cov = report["summary"], report["coverage"]
    down = cov.get("downstream") or {}
    return {"audit": files.join(report["settings"]["run"], AUDIT_DIR, AUDIT_FILE),
            "n_features": len(report["features"]),
            **{f"{k}_median": s[k]["median"] for k in SCORES},
            **{f"{k}_median_random": s[k]["median_random"] for k in SCORES},
            **{f"{k}_margin": s[k].get("margin") for k in SCORES},
            **{f"{k}_auc": s[k]["auc"] for k in SCORES},
            "fvu": cov["fvu"], "no_active_fraction": cov["no_active_fraction"],
            "unexplained_token_median": cov["per_token"]["p50"],
            "unexplained_document_median": cov["per_document"]["p50"],
            "downstream_loss_mean": (down.get("per_sequence") or {}).get("mean"),
            "poisoning_flagged": (report.get("poisoning") or {}).get("n_flagged"),
            "poisoning_features": (report.get("poisoning") or {}).get("flagged_features"),
            "seconds": report["seconds"]["total"]}
