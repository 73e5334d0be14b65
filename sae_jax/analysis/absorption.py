"""Feature absorption on the first-letter task, as SAEBench defines it (Chanin et al., "A is
for Absorption", 2024; the absorption fraction by Demian Till; SAEBench
`sae_bench/evals/absorption`).

**The task.** A token whose string is alphabetic (a word-initial token: WordPiece's `##`
continuations are left out, a BPE token's leading-space mark is stripped) has a first letter.
SAEBench reads each vocabulary word in an ICL spelling prompt; we read the tokens of the
store's labelled held-out sample (`probe_data`), at most `PER_TOKEN` occurrences of each
token, split into train and test by token (a test token never trains a probe, as SAEBench
splits its vocabulary).

**Definition** (SAEBench's, step by step):
1. A ground-truth probe per letter, one vs rest, on the raw activations (the L2 logistic probe
   of `probe_fit`, classes balanced); its unit weight vector p̂ is the letter's direction. Only
   letters whose probe reaches test F1 > `MIN_PROBE_F1` (0.6) are scored.
2. The letter's *main latents* (feature splitting): k-sparse probes for k = 1..`MAX_K` (10)
   on the latents with the largest mean activation difference (signed: latents firing for the
   letter; SAEBench ranks by an L1 probe's weights), classes balanced; k grows while test F1
   improves by more than `F1_JUMP` (0.03) over the best so far; the last k's latents are
   the main latents.
3. Over the letter's test tokens the probe gets right (score > 0), with a = x·p̂ the
   activation's projection on the probe and pᵢ = fᵢ (W_dec,ᵢ·p̂) latent i's contribution to the
   reconstruction's projection (raw units; SAEBench's fᵢ·cos assumes unit decoder rows):
   - **absorption fraction**: M = Σ pᵢ over the main latents; the absorbers are the other
     latents with cos(W_dec,ᵢ, p̂) ≥ `FRACTION_COS` (0.1) and pᵢ > 0, their top
     `MAX_ABSORBERS` (3) summing to A. If M ≥ a, a ≤ 0 or A < `PROJ_PROPORTION`·a (0.4), 0;
     else if M ≤ 0, 1; else min(A, a − M) / (min(A, a − M) + M), clipped to [0, 1].
   - **full absorption**: every main latent is silent (< 1e-8), the latent with the largest
     pᵢ has cos ≥ `FULL_COS` (0.025), a ≥ 0, and that latent's pᵢ ≥ 0.4·a.
4. Per letter, the mean fraction and the rate of full absorption over those tokens;
   `absorption_rate` and `absorption_full_rate` are their means over the scored letters
   (lower is better).

SAEBench recommends ≥ 1B-parameter models and ≥ 16k latents: on a small encoder and a narrow
SAE the numbers are a measurement of that model and SAE, not of SAEBench's leaderboard.
"""

from __future__ import annotations

import string
import sys

import numpy as np

from sae_jax.analysis.probe_data import PROBE_ROWS, load_sample
from sae_jax.analysis.probe_fit import (
    class_means,
    f1_score,
    fit_logistic,
    latent_columns,
    top_latents,
)
from sae_jax.errors import UserError

LETTERS = string.ascii_lowercase
MAX_K = 10
F1_JUMP = 0.03
MIN_PROBE_F1 = 0.6
FULL_COS = 0.025
FRACTION_COS = 0.1
PROJ_PROPORTION = 0.4
MAX_ABSORBERS = 3
PER_TOKEN = 4
MIN_ROWS = 10  # train rows of a letter (and test rows) for it to be probed at all
TEST_FRACTION = 0.3
EPS = 1e-8
SEED = 0
METRICS = ("absorption_rate", "absorption_full_rate")


def first_letter(token: str | None) -> int:
    """The `LETTERS` index of an alphabetic, word-initial token's first letter, else -1."""
    if not token or token.startswith("##"):
        return -1
    word = token.lstrip("Ġ▁ ")
    return LETTERS.index(word[0].lower()) if word.isascii() and word.isalpha() else -1


def letter_rows(token_ids: np.ndarray, tokenizer, per_token: int = PER_TOKEN,
                seed: int = SEED, test_fraction: float = TEST_FRACTION):
    """The rows of the task: `(row indices, their letters, test mask)`, at most `per_token`
    rows of each token id, a seeded `test_fraction` of the distinct tokens held out."""
    ids, inverse = np.unique(token_ids, return_inverse=True)
    letter_of = np.array([first_letter(tokenizer.id_to_token(int(i))) for i in ids], np.int64)
    rng = np.random.default_rng(seed)
    order = np.argsort(inverse, kind="stable")  # rows grouped by token
    bounds = np.searchsorted(inverse[order], np.arange(len(ids) + 1))
    keep = [rng.choice(order[bounds[t]:bounds[t + 1]], min(per_token, bounds[t + 1] - bounds[t]),
                       replace=False) for t in np.flatnonzero(letter_of >= 0)]
    rows = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    tokens = np.unique(token_ids[rows])
    test_tokens = rng.choice(tokens, int(round(test_fraction * len(tokens))), replace=False)
    letters = letter_of[inverse[rows]]
    return rows, letters, np.isin(token_ids[rows], test_tokens)


def main_latents(f_train, y_train, f_test, y_test, order, max_k: int = MAX_K,
                 jump: float = F1_JUMP) -> tuple[list[int], list[float]]:
    """SAEBench's feature split: `(main latent ids, test F1 per k)`; `f_*` hold the latents
    `order` (best first) as columns."""
    best, chosen, f1s = -np.inf, [], []
    for k in range(1, min(max_k, len(order)) + 1):
        probe = fit_logistic(f_train[:, :k], y_train, balanced=True)
        f1 = f1_score(probe.predict(f_test[:, :k]), y_test)
        f1s.append(f1)
        if f1 > best + jump:
            best, chosen = f1, list(order[:k])
        else:
            break
    return [int(i) for i in chosen], f1s


def token_absorption(x_proj: np.ndarray, f: np.ndarray, w_dec_proj: np.ndarray,
                     cos: np.ndarray, main: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per token: `(absorption fraction, full absorption)` (module docstring, step 3).

    Args:
      x_proj: `(n,)` each activation's projection on the unit probe direction.
      f: `(n, F)` the latents.
      w_dec_proj: `(F,)` each decoder row's projection on the probe direction (raw units).
      cos: `(F,)` cosine of each decoder row with the probe direction.
      main: the letter's main latents.
    """
    proj = f * w_dec_proj[None, :]
    main_proj = proj[:, main].sum(1)
    candidate = np.ones(len(cos), bool)
    candidate[main] = False
    absorbers = np.where(candidate & (cos >= FRACTION_COS), proj, 0.0)
    absorbers = np.where(absorbers > 0, absorbers, 0.0)
    top = -np.sort(-absorbers, axis=1)[:, :MAX_ABSORBERS].sum(1)
    unaccounted = np.minimum(top, x_proj - main_proj)
    with np.errstate(divide="ignore", invalid="ignore"):
        partial = np.clip(unaccounted / (unaccounted + main_proj), 0.0, 1.0)
    none = (main_proj >= x_proj) | (top < PROJ_PROPORTION * x_proj) | (x_proj <= 0)
    fraction = np.where(none, 0.0,
                        np.where(main_proj <= 0, 1.0, partial))
    best = np.argmax(proj, axis=1)
    best_proj = proj[np.arange(len(proj)), best]
    full = ((f[:, main] < EPS).all(1) & (cos[best] >= FULL_COS) & (x_proj >= 0)
            & (best_proj >= PROJ_PROPORTION * x_proj))
    return fraction, full


def absorption(sae, x: np.ndarray, letters: np.ndarray, test: np.ndarray) -> dict:
    """The first-letter absorption of `sae` on rows `x` with letter indices `letters` and a
    test mask (module docstring): `{"letters": {letter: detail}, "absorption_rate",
    "absorption_full_rate"}` (None when no letter's probe passes `MIN_PROBE_F1`)."""
    x = np.asarray(x[:, :sae.d_in], np.float32)
    w_dec = np.asarray(sae.params["W_dec"], np.float64) / sae.output_scale
    scored = [c for c in range(len(LETTERS))
              if min(np.sum((letters == c) & ~test), np.sum((letters == c) & test)) >= MIN_ROWS]
    train = np.flatnonzero(~test)
    groups = np.stack([letters[train] == c for c in scored] +
                      [letters[train] != c for c in scored], 1)
    means = class_means(sae.encode, x[train], groups) if scored else None
    out = {}
    for j, c in enumerate(scored):
        y_tr, y_te = letters[train] == c, letters[test] == c
        probe = fit_logistic(x[train], y_tr, balanced=True)
        probe_f1 = f1_score(probe.predict(x[test]), y_te)
        entry = {"probe_f1": probe_f1, "n_test_tokens": int(y_te.sum())}
        out[LETTERS[c]] = entry
        if probe_f1 <= MIN_PROBE_F1:
            continue
        order = top_latents(means[j], means[len(scored) + j], MAX_K, signed=True)
        f_tr = latent_columns(sae.encode, x[train], order)
        f_te = latent_columns(sae.encode, x[test], order)
        main, f1s = main_latents(f_tr, y_tr, f_te, y_te, order)
        rows = np.flatnonzero(test & (letters == c))
        rows = rows[probe.predict(x[rows])]
        direction = probe.w / np.linalg.norm(probe.w)
        w_proj = w_dec @ direction
        cos = w_proj / np.maximum(np.linalg.norm(w_dec, axis=1), 1e-12)
        f = np.asarray(sae.encode(x[rows]), np.float64) if len(rows) else np.zeros(
            (0, len(w_dec)))
        fraction, full = token_absorption(x[rows] @ direction, f, w_proj, cos, main)
        entry.update({"main_latents": main, "sparse_f1": f1s, "n_probe_true_positives":
                      int(len(rows)), "absorption_rate": float(fraction.mean()) if len(rows)
                      else 0.0, "absorption_full_rate": float(full.mean()) if len(rows) else 0.0})
    rated = [e for e in out.values() if "absorption_rate" in e]
    return {"letters": out, **{m: (float(np.mean([e[m] for e in rated])) if rated else None)
                               for m in METRICS}}


def suite(sae, store, args) -> dict:
    """The evals suite (`sae-jax evals --suite absorption`): `{"metrics", "higher_is_better",
    "detail"}`, lower is better. Reads `args.corpus` and `args.probe_rows` when present. A
    store that cannot be labelled, or a transcoder (its decoder writes another space than
    the probe reads), gives None metrics with the reason in `detail`.

    `higher_is_better` is left empty on purpose: it names the metrics a random baseline can
    be compared on, and absorption is not one. A random SAE has no latent that tracks a
    letter, so nothing can absorb one: it scores 0 by construction, and a "margin" over it
    would call every trained SAE worse than chance."""
    higher: dict[str, bool] = {}

    def skipped(reason: str) -> dict:
        print(f"sae-jax: warning: absorption skipped: {reason}", file=sys.stderr)
        return {"metrics": dict.fromkeys(METRICS), "higher_is_better": higher,
                "detail": {"skipped": reason}}

    if sae.transcoder:
        return skipped("the SAE is a transcoder")
    try:
        sample = load_sample(store, sae.config.holdout,
                             getattr(args, "probe_rows", PROBE_ROWS) or PROBE_ROWS,
                             getattr(args, "corpus", None))
    except UserError as e:
        return skipped(str(e))
    rows, letters, test = letter_rows(sample.token_ids, sample.tokenizer)
    result = absorption(sae, sample.x[rows], letters, test)
    detail = {"letters": result["letters"], "n_rows": int(len(rows)),
              "n_tokens": int(len(np.unique(sample.token_ids[rows]))),
              "n_letters_scored": sum("absorption_rate" in e for e in result["letters"].values())}
    return {"metrics": {m: result[m] for m in METRICS}, "higher_is_better": higher,
            "detail": detail}
