"""`sae-jax audit RUN DATA`: faithfulness and coverage of a trained SAE, in one report.

Scores (definitions in `faithfulness` and `coverage`) on a MiniLM harvest:

1. **Contexts.** The held-out rows (the store's tail; at most `max_heldout_rows`) are cut
   into windows of `window - 2` consecutive tokens of one document, read from the store's
   token ids, each wrapped as `[CLS] ... [SEP]`; `n_windows` of them (a seeded sample) are
   run through MiniLM. Spliced positions follow `fidelity`: document tokens (plus
   `[CLS]`/`[SEP]` for a `keep_special` store). Short windows keep a single token's
   ablation visible in the mean-pooled embedding and the model calls cheap.
2. **Features.** Of the features firing on at least `MIN_CONTEXTS` window positions, a
   seeded random order is taken; a feature catalog (`interpret.build_catalog`) of the
   first 2 × `n_features` of them is built on the *explanation rows* (the last
   `explain_rows` training rows), and the first `n_features` that fire there at least
   `MIN_EXPLAIN` times are scored. The same is done for the random control
   (`faithfulness.random_sae`, seeded), so real and random distributions are comparable.
3. **Scores.** Causal (ablation, steering) on the windows; explanatory on all the held-out
   rows; coverage of the trained SAE on the held-out rows and, through `fidelity`, on
   `n_sequences` whole held-out sequences.

Writes `RUN/audit/audit.json` (settings, summary, per-feature scores of both SAEs,
histograms, best/worst features, coverage, dark matter) and `RUN/audit/feature_catalog.json`
(the explanation-rows catalog of the scored features, each entry with an `audit` dict of its
scores; `interpret.read_catalog` reads it). `--dashboard SITE` also adds the audit to an
existing `sae-jax dashboard` site (`audit.js`); `sae-jax dashboard` picks it up by itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np

from sae_jax import files
from sae_jax.analysis import coverage, faithfulness
from sae_jax.analysis.faithfulness import MIN_CONTEXTS
from sae_jax.errors import UserError

AUDIT_DIR = "audit"
AUDIT_FILE = "audit.json"
MIN_EXPLAIN = 3  # firings in the explanation rows needed for an explanation
SCORES = ("causal", "ablation_r", "explanatory", "f1")
SCORE_RANGES = {"causal": (-5.0, 15.0), "ablation_r": (0.9, 1.0), "explanatory": (-0.2, 1.0),
                "f1": (0.0, 1.0)}  # histogram ranges; values outside go to the end bins
N_LISTED = 10
CONCEPT_BATCH = 64
CONCEPT_TOKENS = 32  # catalog contexts are 13 tokens; their texts re-tokenize to about that


# ----------------------------------------------------------------------------------------
# Contexts: held-out windows from the store's own tokens


def window_starts(positions: np.ndarray, length: int, min_tokens: int = 4) -> np.ndarray:
    """`(k, 2)` [start, stop) row ranges: runs of consecutive document tokens (same
    document, position +1) cut into pieces of at most `length`; pieces shorter than
    `min_tokens` dropped."""
    doc, pos = positions[:, 0], positions[:, 1]
    real = pos >= 0
    brk = np.flatnonzero(~real[1:] | ~real[:-1] | (doc[1:] != doc[:-1])
                         | (pos[1:] != pos[:-1] + 1)) + 1
    out = []
    for lo, hi in zip(np.r_[0, brk], np.r_[brk, len(pos)]):
        if not real[lo]:
            continue
        for s in range(lo, hi, length):
            if min(hi, s + length) - s >= min_tokens:
                out.append((s, min(hi, s + length)))
    return np.asarray(out, np.int64).reshape(-1, 2)


def heldout_windows(token_ids: np.ndarray, positions: np.ndarray, tokenizer, window: int,
                    n: int, seed: int, keep_special: bool) -> tuple[np.ndarray, ...]:
    """MiniLM inputs `(ids, mask, splice)`, each `(n, window)`, for a seeded sample of the
    held-out windows (module docstring)."""
    from sae_jax.lm.corpus import Specials

    spans = window_starts(positions, window - 2)
    if not len(spans):
        raise UserError("the held-out rows hold no run of document tokens to audit")
    pick = np.sort(np.random.default_rng(seed).choice(len(spans), min(n, len(spans)),
                                                      replace=False))
    sp = Specials.of(tokenizer)
    ids = np.full((len(pick), window), sp.pad, np.int32)
    mask = np.zeros((len(pick), window), np.int32)
    splice = np.zeros((len(pick), window), bool)
    for r, (lo, hi) in enumerate(spans[pick]):
        k = hi - lo
        ids[r, 0], ids[r, 1:k + 1], ids[r, k + 1] = sp.cls, token_ids[lo:hi], sp.sep
        mask[r, :k + 2] = 1
        splice[r, 1:k + 1] = True
        if keep_special:
            splice[r, [0, k + 1]] = True
    return ids, mask, splice


@functools.lru_cache(maxsize=16)
def _jit(fn, **static):
    """`jax.jit(fn)` with keyword arguments bound, compiled once per process."""
    import jax

    return jax.jit(functools.partial(fn, **static))


def _hidden(params, ids, mask, layer: int, batch: int = 64) -> np.ndarray:
    """MiniLM's residual stream after `layer` (n, T, d) float32, in padded batches of
    `batch` windows (one compiled shape)."""
    fn = _jit(_layer_states, layer=layer)
    n, pad = len(ids), -len(ids) % batch
    ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
    mask[n:, 0] = 1
    return np.concatenate([np.asarray(fn(params, ids[i:i + batch], mask[i:i + batch]))
                           for i in range(0, len(ids), batch)])[:n]


def _layer_states(params, ids, mask, layer: int):
    from sae_jax.lm import minilm

    return minilm.forward(params, ids, mask, n_layers=layer)[layer]


# ----------------------------------------------------------------------------------------
# Scoring one SAE (the trained one or the random control)


def _select(counts: np.ndarray, n: int, seed: int) -> np.ndarray:
    alive = np.flatnonzero(counts >= MIN_CONTEXTS)
    return np.random.default_rng(seed).permutation(alive)[:2 * n]


def _concepts(params, entries: list[dict], tokenizer) -> np.ndarray:
    """Unit mean sentence embedding of each feature's top-example texts (`steer`'s concept
    texts), embedded at one fixed shape so MiniLM compiles once."""
    from sae_jax.analysis.steer import concept_texts
    from sae_jax.lm import minilm

    texts = [concept_texts(e, tokenizer) for e in entries]
    flat = [t for ts in texts for t in ts]
    ids, mask = minilm.tokenize(tokenizer, flat or [""], CONCEPT_TOKENS, fixed=True)
    n, pad = len(ids), -len(ids) % CONCEPT_BATCH
    ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
    mask[n:, 0] = 1  # a padding row still needs one key to attend to
    fn = _jit(minilm.embed)
    emb = np.concatenate([np.asarray(fn(params, ids[i:i + CONCEPT_BATCH],
                                        mask[i:i + CONCEPT_BATCH]), np.float64)
                          for i in range(0, len(ids), CONCEPT_BATCH)])
    out, p = [], 0
    for ts in texts:
        c = emb[p:p + len(ts)].mean(0) if ts else np.zeros(emb.shape[1])
        out.append(c / max(np.linalg.norm(c), 1e-12))
        p += len(ts)
    return np.stack(out)


def score_sae(sae, ctx: dict, n_features: int, settings: dict, log) -> tuple:
    """Per-feature causal and explanatory scores of `sae` (module docstring, steps 2-3).

    Returns `(records, catalog, heldout_pass)`: one dict per scored feature, the catalog of
    the scored features (explanation rows), and the held-out pass (`coverage.HeldoutPass`)."""
    from sae_jax.analysis.interpret import build_catalog

    t0 = time.perf_counter()
    flat = ctx["h"][ctx["splice"]]
    counts = faithfulness.firing_counts(sae, flat)
    cand = _select(counts, n_features, settings["seed"])
    if not len(cand):
        raise UserError(f"no feature fires on {MIN_CONTEXTS} or more of the "
                        f"{len(flat)} held-out window tokens")
    catalog = build_catalog(sae, ctx["explain"], tokenizer=ctx["tokenizer"], features=cand,
                            top_k=10, n_sample=1, n_quantiles=1, per_quantile=1,
                            run=settings["run"])
    entry = {f["id"]: f for f in catalog.features}
    chosen = [int(i) for i in cand if entry[int(i)]["count"] >= MIN_EXPLAIN][:n_features]
    if not chosen:
        raise UserError("no audited feature fires in the explanation rows (raise "
                        "--explain-rows)")
    entries = [entry[i] for i in chosen]
    catalog.features = entries
    log(f"  {len(chosen)} features chosen; catalog {time.perf_counter() - t0:.1f}s")
    cols = np.asarray(chosen)
    win_acts = np.zeros((len(cols), *ctx["splice"].shape), np.float32)
    win_acts[:, ctx["splice"]] = faithfulness.feature_columns(sae, flat, cols).T
    directions = np.asarray(sae.params["W_dec"], np.float32)[cols] / sae.input_scale
    concepts = _concepts(ctx["model"].params, entries, ctx["tokenizer"])
    values = settings["steer_times"] * np.array([e["max_activation"] for e in entries])
    t1 = time.perf_counter()
    causal = faithfulness.causal_scores(
        ctx["output_fn"], ctx["model"].params, ctx["windows"], win_acts, directions,
        concepts, values, ctx["neutral"], n_contexts=settings["n_contexts"],
        n_random=settings["n_random"], seed=settings["seed"], feature_ids=cols)
    t2 = time.perf_counter()
    hp = coverage.heldout_pass(sae, ctx["heldout"], ctx["mean"], cols)
    log(f"  causal scores {t2 - t1:.1f}s, held-out pass {time.perf_counter() - t2:.1f}s")
    records = []
    for j, e in enumerate(entries):
        expl = faithfulness.explanation(list(zip(e["top_token_ids"],
                                                 [c for _, c in e["top_tokens"]])),
                                        ctx["token_totals"])
        scores = {**causal[j], **faithfulness.explanatory_score(hp.acts[:, j],
                                                                ctx["token_ids"], expl)}
        records.append({"id": e["id"], "label": _label(e),
                        "heldout_frequency": float(np.mean(hp.acts[:, j] > 0)),
                        "max_activation": e["max_activation"],
                        "explanation": [[t, round(float(r), 4)] for (t, _), r in
                                        zip(e["top_tokens"], expl["rates"])],
                        **{k: _round(v) for k, v in scores.items()}})
    return records, catalog, hp


def _label(entry: dict) -> str:
    from sae_jax.analysis.steer import feature_label

    return feature_label(entry)


def _round(v):
    return float(f"{v:.5g}") if isinstance(v, float) else v


# ----------------------------------------------------------------------------------------
# The report


def _median(records: list[dict], key: str) -> float | None:
    v = [r[key] for r in records if r.get(key) is not None]
    return float(np.median(v)) if v else None


def summarize(real: list[dict], control: list[dict]) -> dict:
    """Median of every score for both SAEs and the AUC separating them (`faithfulness`)."""
    out = {}
    for key in SCORES + ("steer_winrate", "precision", "recall"):
        out[key] = {"median": _round(_median(real, key)),
                    "median_random": _round(_median(control, key)),
                    "auc": _round(faithfulness.auc([r.get(key) for r in real],
                                                   [r.get(key) for r in control]))}
    return out


def ranked(records: list[dict], key: str, n: int = N_LISTED) -> dict:
    """The `n` best and worst features by `key` (None scores left out)."""
    have = sorted((r for r in records if r.get(key) is not None), key=lambda r: (r[key], r["id"]))
    brief = [{"id": r["id"], "label": r["label"], key: r[key]} for r in have]
    return {"best": brief[::-1][:n], "worst": brief[:n]}


def audit(run_dir, data_dir=None, *, n_features: int = 256, n_windows: int = 512,
          window: int = 32, n_neutral: int = 4, n_contexts: int = 8, n_random: int = 8,
          steer_times: float = 2.0, explain_rows: int = 131072,
          max_heldout_rows: int = 100_000, n_sequences: int = 128, n_dark: int = 20,
          corpus=None, seed: int = 0, log=None) -> dict:
    """Audits a run (module docstring) and returns the full report (what `audit.json` holds).

    Raises:
      UserError: not a MiniLM harvest, a transcoder, too little held-out data, or bad sizes.
    """
    import sae_jax
    from sae_jax.analysis.fidelity import MODEL_NAME, NOT_MODEL_BACKED
    from sae_jax.data.store import RowSpan, open_store
    from sae_jax.lm import minilm
    from sae_jax.rundir import read_run

    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    for name, v, lo in (("n_features", n_features, 1), ("n_windows", n_windows, 1),
                        ("window", window, 4), ("n_neutral", n_neutral, 1),
                        ("n_contexts", n_contexts, MIN_CONTEXTS), ("n_random", n_random, 2),
                        ("explain_rows", explain_rows, 1), ("max_heldout_rows",
                                                            max_heldout_rows, 1)):
        if v < lo:
            raise UserError(f"{name} must be at least {lo}, got {v}")
    if window > minilm.MAX_POSITIONS:
        raise UserError(f"window must be at most {minilm.MAX_POSITIONS}, got {window}")
    sae = sae_jax.load(run_dir)
    store = open_store(data_dir if data_dir is not None else read_run(run_dir).data_dir)
    meta = store.meta
    if (meta.get("source") != "harvest" or meta.get("model") != MODEL_NAME
            or store.token_ids is None or store.positions is None or "layer" not in meta):
        raise UserError(f"the audit runs MiniLM: {NOT_MODEL_BACKED} (store {store.path})")
    if getattr(sae.config, "transcoder", False) or meta.get("pair"):
        raise UserError("the audit splices an SAE into the residual stream; transcoders "
                        "are not supported")
    if store.d_in != sae.d_in:
        raise UserError(f"store {store.path} has d_in={store.d_in}, but the SAE expects "
                        f"d_in={sae.d_in}")
    train, held = store.split(sae.config.holdout)
    held = RowSpan(store, held.start, min(held.stop, held.start + max_heldout_rows))
    explain = RowSpan(store, max(0, train.stop - explain_rows), train.stop)
    layer, keep_special = int(meta["layer"]), bool(meta.get("keep_special", False))
    settings = {"run": str(run_dir), "data_dir": str(store.path), "layer": layer,
                "n_features": n_features, "n_windows": n_windows, "window": window,
                "n_neutral": n_neutral, "n_contexts": n_contexts, "n_random": n_random,
                "steer_times": steer_times, "explain_rows": [explain.start, explain.stop],
                "heldout_rows": [held.start, held.stop], "n_sequences": n_sequences,
                "seed": seed}
    model = minilm.MiniLM.load()
    tok = model.tokenizer
    token_ids = np.asarray(store.token_ids[held.start:held.stop].read().result(), np.int64)
    positions = np.asarray(store.positions[held.start:held.stop].read().result(), np.int64)
    ids, mask, splice = heldout_windows(token_ids, positions, tok, window, n_windows, seed,
                                        keep_special)
    output_fn = faithfulness.minilm_output(layer)
    h = _hidden(model.params, ids, mask, layer)
    windows = faithfulness.Windows(h, mask, splice, faithfulness.clean_outputs(
        output_fn, model.params, h, mask))
    ex_tokens = np.asarray(store.token_ids[explain.start:explain.stop].read().result(),
                           np.int64)
    ctx = {"h": h, "splice": splice, "windows": windows, "model": model,
           "tokenizer": tok, "output_fn": output_fn, "explain": explain, "heldout": held,
           "token_ids": token_ids, "mean": coverage.rows_mean(held),
           "neutral": np.unique(np.linspace(0, len(ids) - 1, n_neutral).round().astype(int)),
           "token_totals": np.bincount(ex_tokens, minlength=int(max(
               ex_tokens.max(initial=0), token_ids.max(initial=0))) + 1)}
    seconds = {"contexts": time.perf_counter() - t0}
    log(f"audit: {len(ids)} windows, {int(splice.sum())} tokens ({seconds['contexts']:.1f}s)")
    log("audit: trained SAE")
    real, catalog, hp = score_sae(sae, ctx, n_features, settings, log)
    seconds["trained"] = time.perf_counter() - t0 - sum(seconds.values())
    log("audit: random control")
    control, _, _ = score_sae(faithfulness.random_sae(sae, seed + 1), ctx, n_features,
                              settings, log)
    seconds["random"] = time.perf_counter() - t0 - sum(seconds.values())
    cov = coverage.token_coverage(hp, positions, token_ids, held.start, tok, n_dark)
    try:
        cov["downstream"] = coverage.downstream_coverage(sae, store, n_sequences, seed, corpus)
    except UserError as e:
        cov["downstream"] = None
        log(f"warning: downstream coverage skipped: {e}")
    seconds["coverage"] = time.perf_counter() - t0 - sum(seconds.values())
    seconds["total"] = time.perf_counter() - t0
    log(f"audit: coverage {seconds['coverage']:.1f}s; total {seconds['total']:.1f}s")
    report = {
        "format": "sae_jax audit", "version": 1, "step": int(sae.step),
        "arch": sae.config.arch, "width": int(sae.width), "settings": settings,
        "summary": summarize(real, control),
        "histograms": {k: {"real": coverage.histogram([r.get(k) for r in real],
                                                      *SCORE_RANGES[k], 30),
                           "random": coverage.histogram([r.get(k) for r in control],
                                                        *SCORE_RANGES[k], 30)}
                       for k in SCORES},
        "ranked": {k: ranked(real, k) for k in ("causal", "explanatory")},
        "features": real, "random_features": control, "coverage": cov,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    by_id = {r["id"]: r for r in real}
    for e in catalog.features:
        e["audit"] = {k: v for k, v in by_id[e["id"]].items() if k not in ("id", "label")}
    catalog.header["audit"] = AUDIT_FILE
    write_report(report, catalog, run_dir)
    return report


def write_report(report: dict, catalog, run_dir) -> str:
    """Writes `RUN/audit/audit.json` and the audited catalog; returns the JSON's path."""
    from pathlib import Path

    from sae_jax.analysis.interpret import write_catalog

    out = files.join(str(run_dir), AUDIT_DIR)
    if not files.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    path = files.join(out, AUDIT_FILE)
    files.write_text(path, json.dumps(report, allow_nan=False, ensure_ascii=False))
    write_catalog(catalog, out)
    return path


def summary_of(report: dict) -> dict:
    """The command's result line: medians, separation from random, coverage numbers."""
    s, cov = report["summary"], report["coverage"]
    down = cov.get("downstream") or {}
    return {"audit": files.join(report["settings"]["run"], AUDIT_DIR, AUDIT_FILE),
            "n_features": len(report["features"]),
            **{f"{k}_median": s[k]["median"] for k in SCORES},
            **{f"{k}_median_random": s[k]["median_random"] for k in SCORES},
            **{f"{k}_auc": s[k]["auc"] for k in SCORES},
            "fvu": cov["fvu"], "no_active_fraction": cov["no_active_fraction"],
            "unexplained_token_median": cov["per_token"]["p50"],
            "unexplained_document_median": cov["per_document"]["p50"],
            "downstream_loss_mean": (down.get("per_sequence") or {}).get("mean"),
            "seconds": report["seconds"]["total"]}


# ----------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`sae-jax audit RUN_DIR [DATA_DIR] [--features N] [...]`."""
    parser.add_argument("run_dir", help="a trained run")
    parser.add_argument("data_dir", nargs="?",
                        help="its MiniLM harvest (default: the run's training store)")
    parser.add_argument("--features", type=int, default=256,
                        help="alive features to score, and as many random ones (default 256)")
    parser.add_argument("--windows", type=int, default=512,
                        help="held-out windows for the causal scores (default 512)")
    parser.add_argument("--window", type=int, default=32,
                        help="tokens per window, [CLS]/[SEP] included (default 32)")
    parser.add_argument("--contexts", type=int, default=8,
                        help="ablation contexts per feature (default 8)")
    parser.add_argument("--random", type=int, default=8,
                        help="random directions per feature for steering (default 8)")
    parser.add_argument("--steer-times", type=float, default=2.0,
                        help="steer by clamping to this multiple of the max activation "
                             "(default 2)")
    parser.add_argument("--explain-rows", type=int, default=131072,
                        help="training rows the explanations come from (default 131072)")
    parser.add_argument("--sequences", type=int, default=128,
                        help="held-out sequences for downstream coverage (default 128)")
    parser.add_argument("--corpus", nargs="+", metavar="PATH",
                        help="the corpus the store was harvested from, if not the default")
    parser.add_argument("--dashboard", metavar="SITE",
                        help="also add the audit to this `sae-jax dashboard` site")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    """Runs `sae-jax audit`; progress goes to stderr, the summary dict is returned."""
    def log(msg):
        print(f"sae-jax: {msg}", file=sys.stderr)

    report = audit(args.run_dir, args.data_dir, n_features=args.features,
                   n_windows=args.windows, window=args.window, n_contexts=args.contexts,
                   n_random=args.random, steer_times=args.steer_times,
                   explain_rows=args.explain_rows, n_sequences=args.sequences,
                   corpus=args.corpus, seed=args.seed, log=log)
    result = summary_of(report)
    if args.dashboard:
        from sae_jax.analysis.dashboard import write_audit_js

        result["dashboard"] = write_audit_js(report, args.dashboard)
    return result
