"""Steering: clamp one SAE feature inside the model and measure what changes downstream.

Feature i is clamped with its error term kept (`intervene.clamp_feature`: h' = h +
(v − f_i(h)) · W_dec[i] / input_scale, so only feature i changes; v = f_i(h) changes nothing).
The clamp value is `--value V`, or `--times X` × the feature's max observed activation (from
the run's feature catalog; negative X pushes against the feature). It is applied at every
**steered position**: the document tokens of each text, not `[CLS]`, `[SEP]` or padding
(the SAE never saw those), unless the store was harvested with `keep_special`: the rule of
`lm.hooks` that `fidelity` splices by too.

**What is reported** for an encoder model (sentence embedding e = mean-pooled, L2-normalised
last layer; cos = cosine similarity), per text and averaged over texts:

* `embedding_change` = 1 − cos(e_steered, e_clean) (0: no effect);
* `concept_cos_before` / `concept_cos_after` = cos(e_clean, c) / cos(e_steered, c), where the
  **concept embedding** c is the mean sentence embedding of the texts of the feature's
  top-activating contexts in the catalog; `concept_cos_change` = after − before;
* `random_concept_cos_change`: the same change when, instead of W_dec[i], a random direction
  of the same norm is added with the same per-position amounts (averaged over `n_random`
  seeded directions) -- the control that makes `concept_cos_change` interpretable: steering
  toward the concept should beat a random push of equal size; `random_embedding_change` is
  that push's 1 − cos;
* `nearest_before` / `nearest_after`: the 3 reference sentences (a fixed seeded sample of
  sequences from the run's held-out documents, rebuilt from its corpus) whose embeddings are
  closest by cosine to e_clean / e_steered;
* `activation_before` = mean of f_i(h) over the steered positions, `value` = the clamp value,
  `activation_after` = mean of f_i(h') as the SAE reads the steered stream back (not exactly
  `value`: the encoder does not invert the decoder, W_enc[:, i]·W_dec[i] ≠ 1 after training,
  and TopK/BatchTopK features compete; below-zero values read back as 0).

On a run whose store is a **causal-LM** harvest, `sae-jax steer` generates from each text as
a prompt instead, clamped and not, with a random-direction control
(`analysis.generation.steer_generation`; its docstring lists what is reported).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sae_jax import files
from sae_jax.analysis.catalog import concept_texts, feature_label, find_catalog
from sae_jax.analysis.generation import check_feature, format_generation, generate_run
from sae_jax.analysis.intervene import (
    activation_before_after,
    feature_direction,
    random_directions,
    steering_hook,
)
from sae_jax.analysis.runs import open_model_run
from sae_jax.data.store import POSITIONS
from sae_jax.errors import UserError
from sae_jax.lm.hooks import (
    check_model_store,
    check_not_transcoder,
    special_ids,
    steered_positions,
)
from sae_jax.vectors import unit_vectors

N_NEAREST = 3
N_REFERENCE = 256
N_RANDOM = 4
REFERENCE_CACHE = "steer_reference.npz"
EMBED_BATCH = 32
SHOWN_CHARS = 100


def embed_texts(model, texts: list[str], batch: int = EMBED_BATCH) -> np.ndarray:
    """Unit sentence embeddings (n, D) float64, `batch` texts per model call."""
    if not texts:
        return np.zeros((0, 0))
    return unit_vectors(np.concatenate([np.asarray(model.embed(texts[i:i + batch]))
                                        for i in range(0, len(texts), batch)]))


# ----------------------------------------------------------------------------------------
# The concept and the reference sentences


@dataclass(frozen=True)
class Reference:
    """Sentences to show as nearest neighbours: their texts and unit embeddings (n, D)."""

    texts: list[str]
    embeddings: np.ndarray

    def nearest(self, emb: np.ndarray, k: int = N_NEAREST) -> list[list[dict]]:
        """For each unit embedding in `emb` (m, D), its `k` most similar sentences."""
        cos = unit_vectors(emb) @ self.embeddings.T
        top = np.argsort(-cos, axis=1, kind="stable")[:, :k]
        return [[{"text": _shown(self.texts[j]), "cos": round(float(c[j]), 4)} for j in row]
                for c, row in zip(cos, top)]


def _shown(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def reference_sequences(store, holdout: float, tokenizer, n: int, seed: int,
                        corpus=None) -> list[str]:
    """The source text of `n` seeded-sampled sequences (the store's cut: `seq_len` − 2
    tokens) of the documents held out by a run with this `holdout`, from the store's corpus.

    The text is the document's own span of characters (via token offsets), so what is shown
    is the original source, not lower-cased WordPiece."""
    import itertools

    from sae_jax.analysis.heldout import rebuild_corpus
    from sae_jax.lm.corpus import Specials, untruncated_copy

    check_model_store(store, "steer")
    heldout = store.split(holdout)[1]
    docs_held = np.unique(np.asarray(
        store.read(POSITIONS, heldout.start, heldout.stop))[:, 0])
    wanted, last = set(docs_held.tolist()), int(docs_held[-1])
    docs = rebuild_corpus(store, corpus)
    body = int(store.meta["seq_len"]) - Specials.of(tokenizer).count
    tok = untruncated_copy(tokenizer)
    spans = []
    for doc in itertools.takewhile(lambda d: d.index <= last, docs):
        if doc.index in wanted:
            offsets = tok.encode(doc.text, add_special_tokens=False).offsets
            spans += [doc.text[offsets[i][0]:offsets[min(i + body, len(offsets)) - 1][1]]
                      for i in range(0, len(offsets), body)]
    if not spans:
        raise UserError(f"the held-out documents of {store.path} hold no text")
    pick = np.sort(np.random.default_rng(seed).choice(len(spans), min(n, len(spans)),
                                                      replace=False))
    return [spans[i] for i in pick]


def reference_for_run(run_dir, model, store, holdout: float, n: int = N_REFERENCE,
                      seed: int = 0, corpus=None) -> Reference:
    """The run's reference sentences, embedded once and cached in `RUN_DIR/steer_reference.npz`
    (local run directories only; the cache is keyed by store, corpus, n and seed)."""
    key = json.dumps({"store": str(store.path), "corpus": store.meta.get("corpus"),
                      "n": n, "seed": seed, "seq_len": store.meta.get("seq_len")})
    cache = None if files.is_remote(str(run_dir)) else Path(run_dir) / REFERENCE_CACHE
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return Reference([str(t) for t in z["texts"]], z["embeddings"])
    texts = reference_sequences(store, holdout, model.tokenizer, n, seed, corpus)
    ref = Reference(texts, embed_texts(model, texts))
    if cache is not None:
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, key=np.array(key), texts=np.array(texts, dtype=str),
                 embeddings=ref.embeddings)
        tmp.replace(cache)
    return ref


# ----------------------------------------------------------------------------------------
# Steering a model


def clamp_value(value: float | None, times: float | None, entry: dict | None) -> float:
    """The clamp value: `value`, or `times` × the catalog's max observed activation."""
    if (value is None) == (times is None):
        raise UserError("give exactly one of value (--value) and times (--times)")
    if value is not None:
        return float(value)
    if entry is None:
        raise UserError("times (--times) needs the feature's max activation from a feature "
                        "catalog; pass value (--value) instead")
    top = float(entry.get("max_activation", 0.0))
    if top <= 0:
        raise UserError(f"feature {entry['id']} never fired in the catalog's rows (max "
                        "activation 0), so --times has no scale; use --value")
    return float(times) * top


def steer(sae, model, texts, feature: int, value: float | None = None,
          times: float | None = None, *, layer: int, catalog=None,
          reference: Reference | None = None, keep_special: bool = False,
          n_random: int = N_RANDOM, seed: int = 0) -> dict:
    """Clamps `feature` at `layer` of `model` on `texts` and reports the downstream effect
    (see the module docstring for every number).

    Args:
      sae: a trained SAE (`sae_jax.load`) on `layer`'s residual stream.
      model: a wrapper with `tokenize(texts) -> (ids, mask)`, `hidden_states(texts) ->
        (states (layers, n, L, d), mask)` and `embed(texts, replace=(layer, fn)) -> (n, D)`
        sentence embeddings, such as `lm.minilm.MiniLM`; its `tokenizer` (if any) names
        the special tokens that are not steered.
      texts: the sentences to steer.
      feature: the feature id, 0..F-1.
      value, times: the clamp value, or a multiple of the feature's max activation in
        `catalog` (exactly one).
      layer: the residual stream the SAE reads (the store's `layer`).
      catalog: a `FeatureCatalog` holding `feature` (for `times` and the concept embedding);
        None leaves the concept numbers out.
      reference: sentences for `nearest_before/after` (None leaves them out).
      keep_special: also steer `[CLS]`/`[SEP]` (a store harvested with `keep_special`).
      n_random: random directions for the control (0: no control).
      seed: seeds the random directions.

    Returns:
      A JSON-friendly dict: the settings, the averages, and `texts`, one dict per text.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise UserError("give at least one text to steer")
    check_not_transcoder(sae.config, "steering")
    check_feature(sae, feature)
    entry = None
    if catalog is not None:
        try:
            entry = catalog.feature(feature)
        except KeyError:
            raise UserError(f"the feature catalog has no entry for feature {feature}") from None
    v = clamp_value(value, times, entry)

    ids, mask = model.tokenize(texts)
    states, _ = model.hidden_states(texts)
    if not 0 <= layer < len(states):
        raise UserError(f"layer must be in 0..{len(states) - 1}, got {layer}")
    where = steered_positions(np.asarray(ids), np.asarray(mask),
                              special_ids(getattr(model, "tokenizer", None)), keep_special)
    n_steered = where.sum(-1)
    sum_before, sum_after = (np.asarray(a, np.float64) for a in activation_before_after(
        sae, jnp.asarray(states[layer]), jnp.asarray(where), jnp.float32(v),
        jnp.int32(feature)))

    direction = feature_direction(sae, feature)
    dirs = np.concatenate([np.asarray(direction)[None],
                           random_directions(direction, n_random, seed)])
    clean = unit_vectors(model.embed(texts))
    hooked = unit_vectors(model.embed(
        texts * len(dirs), replace=(layer, steering_hook(sae, feature, v, where, dirs))))
    n = len(texts)
    steered, randoms = hooked[:n], hooked[n:].reshape(n_random, n, hooked.shape[-1])
    change = 1.0 - np.sum(steered * clean, -1)

    concept = None
    if entry is not None:
        ctexts = concept_texts(entry, getattr(model, "tokenizer", None))
        if ctexts:
            concept = unit_vectors(embed_texts(model, ctexts).mean(0))
    per_text = []
    for t in range(n):
        row = {"text": texts[t], "n_steered": int(n_steered[t]),
               "activation_before": _mean(sum_before[t], n_steered[t]),
               "activation_after": _mean(sum_after[t], n_steered[t]),
               "embedding_change": float(change[t])}
        if n_random:
            row["random_embedding_change"] = float(np.mean(
                1.0 - np.sum(randoms[:, t] * clean[t], -1)))
        if concept is not None:
            before, after = float(clean[t] @ concept), float(steered[t] @ concept)
            row.update(concept_cos_before=before, concept_cos_after=after,
                       concept_cos_change=after - before)
            if n_random:
                row["random_concept_cos_change"] = float(np.mean(randoms[:, t] @ concept)
                                                         - before)
        per_text.append(row)
    if reference is not None:
        near_before, near_after = reference.nearest(clean), reference.nearest(steered)
        for row, b, a in zip(per_text, near_before, near_after):
            row.update(nearest_before=b, nearest_after=a)

    total = int(n_steered.sum())
    out = {"feature": int(feature), "layer": int(layer), "value": v,
           "times": None if times is None else float(times),
           "max_activation": None if entry is None else float(entry["max_activation"]),
           "label": None if entry is None else feature_label(entry),
           "n_texts": n, "n_steered": total,
           "activation_before": _mean(sum_before.sum(), total),
           "activation_after": _mean(sum_after.sum(), total),
           "n_random": int(n_random),
           "n_concept_contexts": 0 if entry is None else len(entry.get("top_examples", []))}
    for name in ("embedding_change", "random_embedding_change", "concept_cos_before",
                 "concept_cos_after", "concept_cos_change", "random_concept_cos_change"):
        vals = [row[name] for row in per_text if name in row]
        out[name] = float(np.mean(vals)) if vals else None
    out["texts"] = per_text
    return out


def _mean(total: float, count: int) -> float | None:
    return float(total) / int(count) if count else None


# ----------------------------------------------------------------------------------------
# A run on MiniLM: `sae-jax steer`


def run_catalog(run_dir, sae, store, feature: int, log=None):
    """The run's feature catalog if it has `feature` (what `sae-jax dashboard` writes in
    RUN_DIR), else a catalog of just that feature built from the run's held-out rows."""
    from sae_jax.analysis.interpret import build_catalog

    log = log or (lambda msg: None)
    catalog = find_catalog(run_dir)
    if catalog is not None:
        ids = {f["id"] for f in catalog.features}
        if catalog.header.get("width") not in (None, sae.width):
            log(f"the catalog in {run_dir} is for width {catalog.header.get('width')}, not "
                f"{sae.width}: rebuilding feature {feature}")
        elif feature in ids:
            if catalog.header.get("step") not in (None, sae.step):
                log(f"note: the catalog was built at step {catalog.header['step']}, the SAE "
                    f"is at step {sae.step}")
            return catalog
    log(f"no catalog entry for feature {feature} in {run_dir} (`sae-jax dashboard` writes "
        "one): scanning the held-out rows for it")
    return build_catalog(sae, store.split(sae.config.holdout)[1], features=[feature],
                         run=str(run_dir))


def steer_run(run_dir, texts, feature: int, value: float | None = None,
              times: float | None = None, layer: int | None = None, corpus=None,
              n_reference: int = N_REFERENCE, n_random: int = N_RANDOM, seed: int = 0,
              log=None, generation: dict | None = None) -> dict:
    """`sae-jax steer`: `steer` on all-MiniLM-L6-v2 with everything taken from the run, or
    `generation.steer_generation` on a causal-LM run (the texts are prompts; `generation`
    holds its max_new_tokens, temperature and top, refused for MiniLM).

    The layer, site, model and `keep_special` come from the run's store
    (`runs.open_model_run`; `layer`, if given, must be the store's), the max activation and
    concept from the run's catalog (`run_catalog`), the reference sentences from its held-out
    documents (`reference_for_run`; skipped with a warning if the corpus cannot be rebuilt).
    """
    log = log or (lambda msg: None)
    if not texts:
        raise UserError("give at least one text to steer")
    run = open_model_run(run_dir, "steer", layer=layer, hint="use the Python API "
                         "`sae_jax.analysis.steer.steer` with your own model", causal=True)
    sae, store, model = run.sae, run.store, run.model
    if generation and not run.causal:
        raise UserError(f"generation settings ({', '.join(sorted(generation))}) apply only "
                        f"to runs on a causal LM; {run_dir} is a MiniLM run")
    check_feature(sae, feature)
    catalog = run_catalog(run_dir, sae, store, feature, log)
    entry = catalog.feature(feature)
    v = clamp_value(value, times, entry)  # fail before the reference pass
    if run.causal:
        return generate_run(run, texts, feature, v, times, entry, n_random=n_random,
                            seed=seed, **(generation or {}))
    reference = None
    if n_reference > 0:
        try:
            reference = reference_for_run(run_dir, model, store, sae.config.holdout,
                                          n_reference, seed, corpus)
        except UserError as e:
            log(f"warning: no nearest sentences: {e}")
    result = steer(sae, model, texts, feature, value, times, layer=run.layer, catalog=catalog,
                   reference=reference, keep_special=run.keep_special, n_random=n_random,
                   seed=seed)
    return {"run": str(run_dir), "n_reference": 0 if reference is None else
            len(reference.texts), **result}


def format_summary(r: dict) -> str:
    """A readable before/after summary of a `steer` result."""
    def num(x, fmt="{:.4f}"):
        return "n/a" if x is None else fmt.format(x)

    how = (f"{r['times']:g} x max activation {r['max_activation']:.4g}"
           if r.get("times") is not None else "given value")
    lines = [f"feature {r['feature']}" + (f" ({r['label']})" if r.get("label") else "")
             + f" clamped to {r['value']:.4g} ({how}) at layer {r['layer']}"]
    for i, t in enumerate(r["texts"], 1):
        lines.append(f"[{i}] {_shown(t['text'])!r}: {t['n_steered']} tokens, activation "
                     f"{num(t['activation_before'], '{:.3g}')} -> "
                     f"{num(t['activation_after'], '{:.3g}')}")
        lines.append(f"    embedding change (1 - cos): {num(t['embedding_change'])}"
                     + (f"   random direction: {num(t.get('random_embedding_change'))}"
                        if "random_embedding_change" in t else ""))
        if "concept_cos_before" in t:
            ctrl = (f"   random direction: {t['random_concept_cos_change']:+.4f}"
                    if "random_concept_cos_change" in t else "")
            lines.append(f"    cos to concept: {t['concept_cos_before']:.4f} -> "
                         f"{t['concept_cos_after']:.4f} ({t['concept_cos_change']:+.4f})"
                         + ctrl)
        for when in ("before", "after"):
            for j, nb in enumerate(t.get(f"nearest_{when}", [])):
                head = f"    nearest {when}:" if j == 0 else " " * 19
                lines.append(f"{head} {nb['cos']:.3f} {nb['text']!r}")
    if r.get("concept_cos_change") is not None:
        lines.append(f"mean over texts: cos to concept {r['concept_cos_before']:.4f} -> "
                     f"{r['concept_cos_after']:.4f} ({r['concept_cos_change']:+.4f}; random "
                     f"direction {num(r.get('random_concept_cos_change'), '{:+.4f}')}), "
                     f"embedding change {r['embedding_change']:.4f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`sae-jax steer RUN_DIR --feature I (--value V | --times X) [--layer L] TEXT...`."""
    parser.add_argument("run_dir", help="a trained run on a MiniLM or causal-LM harvest")
    parser.add_argument("texts", nargs="+", metavar="TEXT",
                        help="sentences to steer (prompts to generate from, on a causal LM)")
    parser.add_argument("--feature", type=int, required=True, help="feature id to clamp")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--value", type=float, help="clamp the feature to this activation")
    how.add_argument("--times", type=float,
                     help="clamp to this multiple of the feature's max observed activation "
                          "(from the run's feature catalog; negative allowed)")
    parser.add_argument("--layer", type=int,
                        help="the layer the run's SAE reads (default: its store's; any other "
                             "layer is refused)")
    parser.add_argument("--corpus", nargs="+", metavar="PATH",
                        help="the corpus the store was harvested from, if not the default "
                             "(for the nearest reference sentences)")
    parser.add_argument("--n-reference", type=int, default=N_REFERENCE,
                        help=f"held-out sequences to search for nearest sentences "
                             f"(default {N_REFERENCE}; 0: none)")
    parser.add_argument("--n-random", type=int, default=N_RANDOM,
                        help=f"random same-norm directions for the control (default "
                             f"{N_RANDOM})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the reference sample, random directions and sampling")
    parser.add_argument("--max-new-tokens", type=int,
                        help="causal LM: tokens to generate per prompt (default 24)")
    parser.add_argument("--temperature", type=float,
                        help="causal LM: sample at this temperature (default 0: greedy)")
    parser.add_argument("--top-logits", dest="top", type=int,
                        help="causal LM: tokens listed whose first logit rose/fell most "
                             "(default 10)")


def run(args) -> dict:
    """Runs `sae-jax steer` from parsed arguments; prints the summary to stderr."""
    if args.n_reference < 0 or args.n_random < 0:
        raise UserError("--n-reference and --n-random must be at least 0")

    def log(msg):
        print(f"sae-jax: {msg}", file=sys.stderr)

    generation = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top")
                  if getattr(args, k, None) is not None}
    result = steer_run(args.run_dir, args.texts, args.feature, args.value, args.times,
                       args.layer, args.corpus, args.n_reference, args.n_random, args.seed,
                       log, generation)
    print((format_generation if "prompts" in result else format_summary)(result),
          file=sys.stderr)
    return result
