"""The gate's result for people: a plain-text table (the terminal) and `gate.md` (a review).

Both read the dict `gate.gate` returns and `gate.json` holds; neither computes anything.
"""

from __future__ import annotations

STATUS_MARK = {"pass": "PASS", "fail": "FAIL", "skipped": "skip", "info": "info"}


def fmt_value(v) -> str:
    """A value as the table shows it: 4 significant digits, "-" for none."""
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _limit(c: dict) -> str:
    return "-" if c["op"] is None or c["threshold"] is None else f"{c['op']} {c['threshold']:g}"


def format_table(result: dict) -> str:
    """The checks as aligned columns, then the verdict (what the command prints)."""
    head = ("check", "value", "limit", "result", "reason")
    lines = [(c["check"], fmt_value(c["value"]), _limit(c), STATUS_MARK[c["status"]], c["reason"])
             for c in result["checks"]]
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(4)]
    out = ["  ".join(v.ljust(w) for v, w in zip(r[:4], widths)) + "  " + r[4]
           for r in [head, *lines]]
    verdict = ("PASS" if result["passed"] else
               f"FAIL ({len(result['failed'])} failed: {', '.join(result['failed'])})")
    out.append(f"gate {verdict}: {result['bundle']}")
    return "\n".join(out)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _feature_line(e: dict) -> str:
    label = e.get("label") or " / ".join(map(str, e.get("top_tokens") or [])) or ""
    best = e.get("best")
    return f"| {e['id']} | {'-' if best is None else f'{best:.3f}'} | {_cell(label)} |"


def _drift_section(drift: dict) -> list[str]:
    c = drift["counts"]
    out = ["", "## Drift against the baseline", "",
           f"PW-MCC (mean one-to-one decoder cosine): **{fmt_value(drift['pwmcc'])}** (median "
           f"{fmt_value(drift['matched_cosine_median'])}); {drift['n_matched']} pair(s) at "
           f"cosine >= {drift['threshold']:g} = {drift['matched_frac_a']:.1%} of the baseline's "
           f"{drift['width_a']} features, {drift['matched_frac_b']:.1%} of this SAE's "
           f"{drift['width_b']}.", "",
           "Baseline (A): " + ", ".join(f"{k[:-2]} {v}" for k, v in c.items()
                                        if k.endswith("_a")) + ".  ",
           "This bundle (B): " + ", ".join(f"{k[:-2]} {v}" for k, v in c.items()
                                           if k.endswith("_b")) + "."]
    for key, side, what in (("vanished", "baseline", "nothing in this SAE points their way"),
                            ("appeared", "new", "nothing in the baseline points their way")):
        ids, examples = drift[key], drift["examples"].get(key) or []
        out += ["", f"### {key.capitalize()}: {len(ids)} {side} features ({what})", ""]
        if not ids:
            out.append("None.")
            continue
        out += ["| id | best cosine | label / top tokens |", "|---|---|---|"]
        out += [_feature_line(e) for e in examples]
        if len(ids) > len(examples):
            rest = ids[:200]
            out += ["", f"All {len(ids)} ids: " + ", ".join(map(str, rest))
                    + (" ..." if len(ids) > len(rest) else "") + " (full list in gate.json)"]
    return out


def _diff_section(diff: dict) -> list[str]:
    c, a, b = diff["counts"], diff["source_a"], diff["source_b"]
    out = ["", "## Model diff (crosscoder)", "",
           f"`{diff['run']}`, {diff['width']} latents: {c['A-only']} {a}-only, {c['shared']} "
           f"shared, {c['B-only']} {b}-only, {c['mixed']} mixed, {c['empty']} empty; "
           f"exclusive fraction **{diff['exclusive_frac']:.2%}** of the non-empty latents "
           f"(exclusive: relative decoder norm within {diff['thresholds']['exclusive']:g} of "
           f"either end)."]
    for key, name in (("a_only", f"{a}-only (the baseline has, this model lost)"),
                      ("b_only", f"{b}-only (new in this model)")):
        ids = diff[key]
        out += ["", f"### {name}: {len(ids)}", "",
                (", ".join(map(str, ids[:200])) + (" ..." if len(ids) > 200 else "")) or "None."]
    if diff["listed_not_shared"]:
        out += ["", "### Listed latents no longer shared", ""]
        out += [f"- {i}: {k}" for i, k in diff["listed_not_shared"]]
    return out


def markdown(result: dict) -> str:
    """`gate.md`: verdict, what was gated, the table of checks, and the drift review."""
    prov = result.get("provenance") or {}
    what = ", ".join(f"{k} {v}" for k, v in prov.items() if v is not None)
    out = [f"# Release gate: {result['verdict'].upper()}", "",
           f"- bundle: `{result['bundle']}`" + (f" ({what})" if what else ""),
           f"- manifest created: {result.get('created') or '-'}",
           f"- baseline: `{result['baseline']}`" if result["baseline"] else "- baseline: none",
           "", "| check | metric | value | limit | result | reason |",
           "|---|---|---|---|---|---|"]
    out += [f"| {c['check']} | {_cell(c['metric'])} | {fmt_value(c['value'])} | {_limit(c)} | "
            f"**{STATUS_MARK[c['status']]}** | {_cell(c['reason'])} |" for c in result["checks"]]
    if result["manifest_problems"]:
        out += ["", "## Manifest problems", ""]
        out += [f"- {_cell(p)}" for p in result["manifest_problems"]]
    if result.get("drift"):
        out += _drift_section(result["drift"])
    if result.get("diff"):
        out += _diff_section(result["diff"])
    return "\n".join(out) + "\n"
