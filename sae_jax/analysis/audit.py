"""`sae-jax audit RUN DATA`: faithfulness and coverage of a trained SAE, in one report.

Scores (definitions in `faithfulness` and `coverage`) on a MiniLM harvest:

1. **Contexts.** The held-out rows (the store's tail; at most `max_heldout_rows`) are cut
   into windows of `window - 2` consecutive tokens of one document, read from the store's
   token ids, each wrapped as `[CLS] ... [SEP]`; `n_windows` of them (a seeded sample) are
   run through MiniLM. Spliced positions follow `lm.hooks`: document tokens (plus
   `[CLS]`/`[SEP]` for a `keep_special` store). Short windows keep a single token's
   ablation visible in the mean-pooled embedding and the model calls cheap.
2. **Features.** Of the features firing on at least `MIN_CONTEXTS` window positions, a
   seeded random order is taken; a feature catalog (`interpret.build_catalog`) of the
   first 2 × `n_features` of them is built on the *explanation rows* (the last
   `explain_rows` training rows), and the first `n_features` that fire there at least
   `MIN_EXPLAIN` times are scored. The same is done for the random control
   (`baselines.random_weights_sae`, seeded), so real and random distributions are comparable.
3. **Scores.** Causal (ablation, steering) on the windows; explanatory on all the held-out
   rows; coverage of the trained SAE on the held-out rows and, through `fidelity`, on
   `n_sequences` whole held-out sequences.
4. **Poisoning.** The reference-free detector (`poisoning`: latents whose activation mass
   sits in few documents, on a repeated n-gram, or far outside the density distribution)
   over every latent of the trained SAE, on the explanation rows; the report's `poisoning`
   key (`--poison-*` options set its thresholds).

Writes `RUN/audit/audit.json` (settings, summary, per-feature scores of both SAEs,
histograms, best/worst features, coverage, dark matter) and `RUN/audit/feature_catalog.json`
(the explanation-rows catalog of the scored features, each entry with an `audit` dict of its
scores; `catalog.read_catalog` reads it). `--dashboard SITE` also adds the audit to an
existing `sae-jax dashboard` site (`audit.js`); `sae-jax dashboard` picks it up by itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from sae_jax.analysis import coverage, faithfulness, poisoning
from sae_jax.analysis.audit_report import (
    AUDIT_FILE,
    SCORE_RANGES,
    SCORES,
    ranked,
    rounded,
    summarize,
    summary_of,
    write_report,
)
from sae_jax.analysis.baselines import random_weights_sae
from sae_jax.analysis.catalog import concept_texts, feature_label
from sae_jax.analysis.dashboard import write_audit_js
from sae_jax.analysis.faithfulness import MIN_CONTEXTS
from sae_jax.analysis.intervene import feature_direction
from sae_jax.analysis.moments import rows_mean
from sae_jax.data.store import POSITIONS, TOKEN_IDS, RowSpan
from sae_jax.errors import UserError
from sae_jax.lm.hooks import embedding_from, layer_state, model_pass
from sae_jax.vectors import unit_vectors

MIN_EXPLAIN = 3  # firings in the explanation rows needed for an explanation
CONCEPT_TOKENS = 32  # catalog contexts are 13 tokens; their texts re-tokenize to about that


@dataclass(frozen=True)
class AuditSettings:
    """The audit's sizes and seed (module docstring; `sae-jax audit --help`)."""

    n_features: int = 256
    n_windows: int = 512
    window: int = 32
    n_neutral: int = 4
    n_contexts: int = 8
    n_random: int = 8
    steer_times: float = 2.0
    explain_rows: int = 131072
    max_heldout_rows: int = 100_000
    n_sequences: int = 128
    n_dark: int = 20
    seed: int = 0

    def __post_init__(self):
        from sae_jax.lm import minilm

        for name, lo in (("n_features", 1), ("n_windows", 1), ("window", 4), ("n_neutral", 1),
                         ("n_contexts", MIN_CONTEXTS), ("n_random", 2), ("explain_rows", 1),
                         ("max_heldout_rows", 1)):
            if getattr(self, name) < lo:
                raise UserError(f"{name} must be at least {lo}, got {getattr(self, name)}")
        if self.window > minilm.MAX_POSITIONS:
            raise UserError(f"window must be at most {minilm.MAX_POSITIONS}, got {self.window}")


@dataclass(frozen=True)
class AuditContext:
    """What both SAEs are scored on.

    Attributes:
      model: MiniLM (`lm.minilm.MiniLM`).
      output_fn: its sentence embedding from the hooked layer (`lm.hooks.embedding_from`).
      windows: the held-out windows, their stream at the layer and clean outputs.
      neutral: indices of the windows steering runs on.
      heldout, explain: the held-out and explanation rows (`RowSpan`s).
      token_ids: the held-out rows' token ids.
      mean: the held-out rows' mean (coverage's reference).
      token_totals: occurrences of each token id in the explanation rows.
    """

    model: object
    output_fn: object
    windows: faithfulness.Windows
    neutral: np.ndarray
    heldout: object
    explain: object
    token_ids: np.ndarray
    mean: np.ndarray
    token_totals: np.ndarray


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


# ----------------------------------------------------------------------------------------
# Scoring one SAE (the trained one or the random control)


def _select(counts: np.ndarray, n: int, seed: int) -> np.ndarray:
    alive = np.flatnonzero(counts >= MIN_CONTEXTS)
    return np.random.default_rng(seed).permutation(alive)[:2 * n]


def _concepts(params, entries: list[dict], tokenizer) -> np.ndarray:
    """Unit mean sentence embedding of each feature's top-example texts (`steer`'s concept
    texts), embedded at one fixed shape so MiniLM compiles once."""
    from sae_jax.lm import minilm

    texts = [concept_texts(e, tokenizer) for e in entries]
    flat = [t for ts in texts for t in ts]
    ids, mask = minilm.tokenize(tokenizer, flat or [""], CONCEPT_TOKENS, fixed=True)
    emb = model_pass(minilm.embed, params, ids, mask).astype(np.float64)
    out, p = [], 0
    for ts in texts:
        out.append(emb[p:p + len(ts)].mean(0) if ts else np.zeros(emb.shape[1]))
        p += len(ts)
    return unit_vectors(np.stack(out))


def score_sae(sae, ctx: AuditContext, settings: AuditSettings, run_dir: str, log) -> tuple:
    """Per-feature causal and explanatory scores of `sae` (module docstring, steps 2-3).

    Returns `(records, catalog, heldout_pass)`: one dict per scored feature, the catalog of
    the scored features (explanation rows), and the held-out pass (`coverage.HeldoutPass`)."""
    from sae_jax.analysis.interpret import build_catalog

    t0 = time.perf_counter()
    windows, tokenizer = ctx.windows, ctx.model.tokenizer
    flat = windows.h[windows.splice]
    counts = faithfulness.firing_counts(sae, flat)
    cand = _select(counts, settings.n_features, settings.seed)
    if not len(cand):
        raise UserError(f"no feature fires on {MIN_CONTEXTS} or more of the "
                        f"{len(flat)} held-out window tokens")
    catalog = build_catalog(sae, ctx.explain, tokenizer=tokenizer, features=cand, top_k=10,
                            n_sample=1, n_quantiles=1, per_quantile=1, run=run_dir)
    entry = {f["id"]: f for f in catalog.features}
    chosen = [int(i) for i in cand
              if entry[int(i)]["count"] >= MIN_EXPLAIN][:settings.n_features]
    if not chosen:
        raise UserError("no audited feature fires in the explanation rows (raise "
                        "--explain-rows)")
    entries = [entry[i] for i in chosen]
    catalog.features = entries
    log(f"  {len(chosen)} features chosen; catalog {time.perf_counter() - t0:.1f}s")
    cols = np.asarray(chosen)
    win_acts = np.zeros((len(cols), *windows.splice.shape), np.float32)
    win_acts[:, windows.splice] = faithfulness.feature_columns(sae, flat, cols).T
    directions = np.asarray(feature_direction(sae, cols))
    concepts = _concepts(ctx.model.params, entries, tokenizer)
    values = settings.steer_times * np.array([e["max_activation"] for e in entries])
    t1 = time.perf_counter()
    causal = faithfulness.causal_scores(
        ctx.output_fn, ctx.model.params, windows, win_acts, directions, concepts, values,
        ctx.neutral, n_contexts=settings.n_contexts, n_random=settings.n_random,
        seed=settings.seed, feature_ids=cols)
    t2 = time.perf_counter()
    hp = coverage.heldout_pass(sae, ctx.heldout, ctx.mean, cols)
    log(f"  causal scores {t2 - t1:.1f}s, held-out pass {time.perf_counter() - t2:.1f}s")
    records = []
    for j, e in enumerate(entries):
        expl = faithfulness.explanation(list(zip(e["top_token_ids"],
                                                 [c for _, c in e["top_tokens"]])),
                                        ctx.token_totals)
        scores = {**causal[j], **faithfulness.explanatory_score(hp.acts[:, j],
                                                                ctx.token_ids, expl)}
        records.append({"id": e["id"], "label": feature_label(e),
                        "heldout_frequency": float(np.mean(hp.acts[:, j] > 0)),
                        "max_activation": e["max_activation"],
                        "explanation": [[t, round(float(r), 4)] for (t, _), r in
                                        zip(e["top_tokens"], expl["rates"])],
                        **{k: rounded(v) for k, v in scores.items()}})
    return records, catalog, hp


# ----------------------------------------------------------------------------------------
# The audit


def audit_context(run, settings: AuditSettings, log) -> tuple[AuditContext, dict, tuple]:
    """The held-out windows and rows both SAEs are scored on, for a `runs.ModelRun`.

    Returns `(context, settings as reported, (positions, held-out span))`."""

    store, sae, model = run.store, run.sae, run.model
    train, held = store.split(sae.config.holdout)
    held = RowSpan(store, held.start, min(held.stop, held.start + settings.max_heldout_rows))
    explain = RowSpan(store, max(0, train.stop - settings.explain_rows), train.stop)
    token_ids = np.asarray(store.read(TOKEN_IDS, held.start, held.stop), np.int64)
    positions = np.asarray(store.read(POSITIONS, held.start, held.stop), np.int64)
    ids, mask, splice = heldout_windows(token_ids, positions, model.tokenizer, settings.window,
                                        settings.n_windows, settings.seed, run.keep_special)
    output_fn = embedding_from(run.layer)
    h = model_pass(layer_state, model.params, ids, mask, layer=run.layer)
    windows = faithfulness.Windows(h, mask, splice, faithfulness.clean_outputs(
        output_fn, model.params, h, mask))
    ex_tokens = np.asarray(store.read(TOKEN_IDS, explain.start, explain.stop), np.int64)
    vocab = int(max(ex_tokens.max(initial=0), token_ids.max(initial=0))) + 1
    ctx = AuditContext(
        model=model, output_fn=output_fn, windows=windows,
        neutral=np.unique(np.linspace(0, len(ids) - 1, settings.n_neutral).round().astype(int)),
        heldout=held, explain=explain, token_ids=token_ids, mean=rows_mean(held),
        token_totals=np.bincount(ex_tokens, minlength=vocab))
    log(f"audit: {len(ids)} windows, {int(splice.sum())} tokens")
    reported = {"run": run.run_dir, "data_dir": str(store.path), "layer": run.layer,
                **{k: v for k, v in asdict(settings).items()
                   if k not in ("max_heldout_rows", "n_dark")},
                "explain_rows": [explain.start, explain.stop],
                "heldout_rows": [held.start, held.stop]}
    return ctx, reported, (positions, held)


def audit(run_dir, data_dir=None, *, corpus=None, log=None,
          poison_thresholds: poisoning.Thresholds | None = None, **sizes) -> dict:
    """Audits a run (module docstring) and returns the full report (what `audit.json` holds).

    Args:
      data_dir: its MiniLM harvest (default: the run's training store).
      corpus: the corpus the store was harvested from, if not the default.
      poison_thresholds: the poisoning detector's (default `poisoning.Thresholds()`).
      sizes: `AuditSettings` fields (n_features, n_windows, window, ..., seed).

    Raises:
      UserError: not a MiniLM harvest, a transcoder, too little held-out data, or bad sizes.
    """
    from sae_jax.analysis.runs import open_model_run

    log = log or (lambda msg: None)
    settings = AuditSettings(**sizes)
    t0 = time.perf_counter()
    run = open_model_run(run_dir, "audit", data_dir=data_dir)
    if run.store.token_ids is None:
        raise UserError(f"the audit needs the token ids of store {run.store.path} (harvest it "
                        "with `sae-jax harvest`)")
    sae, tok = run.sae, run.model.tokenizer
    ctx, reported, (positions, held) = audit_context(run, settings, log)
    seconds = {"contexts": time.perf_counter() - t0}
    log("audit: trained SAE")
    real, catalog, hp = score_sae(sae, ctx, settings, str(run_dir), log)
    seconds["trained"] = time.perf_counter() - t0 - sum(seconds.values())
    log("audit: random control")
    control, _, _ = score_sae(random_weights_sae(sae, settings.seed + 1), ctx, settings,
                              str(run_dir), log)
    seconds["random"] = time.perf_counter() - t0 - sum(seconds.values())
    cov = coverage.token_coverage(hp, positions, ctx.token_ids, held.start, tok,
                                  settings.n_dark)
    try:
        cov["downstream"] = coverage.downstream_coverage(sae, run.store, settings.n_sequences,
                                                         settings.seed, corpus)
    except UserError as e:
        cov["downstream"] = None
        log(f"warning: downstream coverage skipped: {e}")
    seconds["coverage"] = time.perf_counter() - t0 - sum(seconds.values())
    poisoned = poisoning.detect_on_store(sae, ctx.explain, poison_thresholds
                                         or poisoning.Thresholds(), tokenizer=tok)
    seconds["poisoning"] = time.perf_counter() - t0 - sum(seconds.values())
    log(f"audit: poisoning detector flagged {poisoned['n_flagged']} of "
        f"{poisoned['n_scored']} latents ({seconds['poisoning']:.1f}s)")
    seconds["total"] = time.perf_counter() - t0
    log(f"audit: coverage {seconds['coverage']:.1f}s; total {seconds['total']:.1f}s")
    report = {
        "format": "sae_jax audit", "version": 1, "step": int(sae.step),
        "arch": sae.config.arch, "width": int(sae.width), "settings": reported,
        "summary": summarize(real, control),
        "histograms": {k: {"real": coverage.histogram([r.get(k) for r in real],
                                                      *SCORE_RANGES[k], 30),
                           "random": coverage.histogram([r.get(k) for r in control],
                                                        *SCORE_RANGES[k], 30)}
                       for k in SCORES},
        "ranked": {k: ranked(real, k) for k in ("causal", "explanatory")},
        "features": real, "random_features": control, "coverage": cov,
        "poisoning": poisoned,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    by_id = {r["id"]: r for r in real}
    for e in catalog.features:
        e["audit"] = {k: v for k, v in by_id[e["id"]].items() if k not in ("id", "label")}
    catalog.header["audit"] = AUDIT_FILE
    write_report(report, catalog, run_dir)
    return report


# ----------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`sae-jax audit RUN_DIR [DATA_DIR] [--features N] [...]`."""
    parser.add_argument("run_dir", help="a trained run")
    parser.add_argument("data_dir", nargs="?",
                        help="its MiniLM harvest (default: the run's training store)")
    d = AuditSettings()  # the defaults, in one place
    for flag, field, kind, what in (
            ("--features", "n_features", int, "alive features to score, and as many random "
                                               "ones"),
            ("--windows", "n_windows", int, "held-out windows for the causal scores"),
            ("--window", "window", int, "tokens per window, [CLS]/[SEP] included"),
            ("--contexts", "n_contexts", int, "ablation contexts per feature"),
            ("--random", "n_random", int, "random directions per feature for steering"),
            ("--steer-times", "steer_times", float, "steer by clamping to this multiple of "
                                                    "the max activation"),
            ("--explain-rows", "explain_rows", int, "training rows the explanations come "
                                                    "from"),
            ("--sequences", "n_sequences", int, "held-out sequences for downstream "
                                                "coverage")):
        parser.add_argument(flag, type=kind, default=getattr(d, field), dest=field,
                            metavar="N" if kind is int else "X",
                            help=f"{what} (default {getattr(d, field):g})")
    parser.add_argument("--corpus", nargs="+", metavar="PATH",
                        help="the corpus the store was harvested from, if not the default")
    parser.add_argument("--dashboard", metavar="SITE",
                        help="also add the audit to this `sae-jax dashboard` site")
    parser.add_argument("--seed", type=int, default=d.seed)
    poisoning.add_arguments(parser)


def run(args) -> dict:
    """Runs `sae-jax audit`; progress goes to stderr, the summary dict is returned."""
    def log(msg):
        print(f"sae-jax: {msg}", file=sys.stderr)

    sizes = ("n_features", "n_windows", "window", "n_contexts", "n_random", "steer_times",
             "explain_rows", "n_sequences", "seed")
    report = audit(args.run_dir, args.data_dir, corpus=args.corpus, log=log,
                   poison_thresholds=poisoning.thresholds_from_args(args),
                   **{k: getattr(args, k) for k in sizes})
    result = summary_of(report)
    if args.dashboard:
        result["dashboard"] = write_audit_js(report, args.dashboard)
    return result
