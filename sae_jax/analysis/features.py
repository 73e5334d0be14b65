"""Feature extraction for monitoring: which SAE features fire on each token of a text.

`extract_features(sae, model, texts, layer)` tokenises the texts, runs the model up to the
SAE's layer, encodes every token and returns, per text and per token, the `top` features
with activation > `threshold`, most active first, each with its catalog label (the catalog's
`label`, or else its three most frequent tokens joined by " / "). Tokens are the ones the SAE
was trained on: document tokens, not `[CLS]`/`[SEP]`/padding, unless the store was harvested
with `keep_special` (the rule `steer` and `fidelity` use).

One jitted function does model → SAE encode → `top_k` on the device; the host only turns
(n, L, top) values and ids into dicts. Batches are padded to a fixed shape (`batch_size`
texts, or for fewer texts the power of two at or above their count, × `max_len` tokens), so a
stream of batches compiles once.

**Benchmark** (`bench_feature_extraction`, for `sae-jax bench`), compile excluded, from a
tokenised batch to the per-token feature lists on the host:

* `features_latency_ms_per_token` = wall time for one text of `short_len` tokens (`[CLS]` and
  `[SEP]` included) / `short_len`: the serving figure for monitoring one request;
* `features_tokens_per_s` = `n_texts` × `seq_len` / wall time of one batch of `n_texts`
  texts of `seq_len` tokens: throughput for offline scans.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import numpy as np

from sae_jax import saes
from sae_jax.analysis.catalog import find_catalog, labels_from_catalog
from sae_jax.batches import padded_batches
from sae_jax.errors import UserError
from sae_jax.lm.corpus import untruncated_copy
from sae_jax.lm.hooks import (
    check_not_transcoder,
    minilm_activations,
    special_ids,
    steered_positions,
)

DEFAULT_TOP = 5
DEFAULT_MAX_LEN = 128
DEFAULT_BATCH = 16


@functools.partial(jax.jit, static_argnames=("top",))
def _top_features(activations_fn, sae, ids, mask, *, top: int):
    """(values, feature ids), each (n, L, top): the `top` largest activations per token."""
    h = activations_fn(ids, mask)
    values, idx = jax.lax.top_k(sae.encode_raw(h.reshape(-1, h.shape[-1])), top)
    return values.reshape(*ids.shape, top), idx.reshape(*ids.shape, top)


class FeatureExtractor:
    """Model up to `layer` + SAE encode + top-k, jitted once per batch shape.

    Args:
      sae: an `SAE` (`sae_jax.load`, or built around fresh `saes.init` params).
      activations_fn: `(ids, mask) -> (n, L, d)` residual stream at the SAE's layer, as
        `harvest` takes (a `jax.tree_util.Partial` over the weights, e.g.
        `lm.hooks.minilm_activations(layer, params)`); built once so `jit` reuses its cache.
      tokenizer: a `tokenizers.Tokenizer` with BERT special tokens (MiniLM's).
      top: features kept per token (at most the SAE's width).
      max_len: tokens per text including `[CLS]`/`[SEP]`; longer texts are truncated.
      batch_size: texts per model call.
      keep_special: also report `[CLS]`/`[SEP]` (a store harvested with `keep_special`).
    """

    def __init__(self, sae, activations_fn, tokenizer, top: int = DEFAULT_TOP,
                 max_len: int = DEFAULT_MAX_LEN, batch_size: int = DEFAULT_BATCH,
                 keep_special: bool = False):
        check_not_transcoder(sae.config, "feature extraction")
        if not 1 <= top <= sae.width:
            raise UserError(f"top must be in 1..{sae.width}, got {top}")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        self.sae, self.activations_fn, self.tokenizer = sae, activations_fn, tokenizer
        self.top, self.max_len, self.batch_size = top, max_len, batch_size
        self.keep_special = keep_special
        self.specials = special_ids(tokenizer)
        self._untruncated = untruncated_copy(tokenizer)  # to tell truncated texts

    def top_features(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Device part on one padded batch: (values, feature ids) as numpy (n, L, top)."""
        values, idx = _top_features(self.activations_fn, self.sae, ids, mask, top=self.top)
        return np.asarray(values), np.asarray(idx)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from sae_jax.lm import minilm

        return minilm.tokenize(self.tokenizer, texts, self.max_len, fixed=True)

    def __call__(self, texts, threshold: float = 0.0,
                 labels: dict[int, str] | None = None) -> list[dict]:
        """Per text `{"text", "truncated", "tokens": [{"token", "position", "features":
        [{"id", "activation", "label"}, ...]}, ...]}` (see `extract_features`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, mask = self.tokenize(texts)
        out = []
        for b in padded_batches(len(texts), self.batch_size, ids, mask, attend=1):
            (b_ids, b_mask), m = b.arrays, b.n_valid
            values, idx = self.top_features(b_ids, b_mask)
            out += self.collect(texts[b.start:b.start + m], b_ids[:m], b_mask[:m], values[:m],
                                idx[:m], threshold, labels or {})
        return out

    def collect(self, texts, ids, mask, values, idx, threshold: float,
                labels: dict[int, str]) -> list[dict]:
        """Host part: the device's top-k arrays as per-token dicts."""
        where = steered_positions(ids, mask, self.specials, self.keep_special)
        results = []
        for t, text in enumerate(texts):
            tokens = []
            for pos in np.flatnonzero(where[t]):
                feats = [{"id": int(i), "activation": float(v), "label": labels.get(int(i))}
                         for v, i in zip(values[t, pos], idx[t, pos]) if v > threshold]
                tok = self.tokenizer.id_to_token(int(ids[t, pos]))
                tokens.append({"token": tok if tok is not None else f"<{ids[t, pos]}>",
                               "position": int(pos), "features": feats})
            # Truncated: the text filled every slot and its tokenisation is longer.
            truncated = bool(mask[t].all()) and len(
                self._untruncated.encode(text).ids) > self.max_len
            results.append({"text": text, "truncated": truncated, "tokens": tokens})
        return results


def extract_features(sae, model, texts, layer: int, top: int = DEFAULT_TOP,
                     threshold: float = 0.0, catalog=None, *, max_len: int = DEFAULT_MAX_LEN,
                     batch_size: int = DEFAULT_BATCH, keep_special: bool = False) -> list[dict]:
    """The active features of every token of `texts`, most active first.

    Args:
      sae: a trained SAE on `layer`'s residual stream.
      model: `lm.minilm.MiniLM` (its `params` and `tokenizer` are used).
      texts: a string or a list of strings.
      layer: the residual stream the SAE reads (the store's `layer`).
      top: at most this many features per token.
      threshold: keep features with activation > threshold.
      catalog: a `FeatureCatalog` for labels (None: labels are None).
      max_len, batch_size, keep_special: see `FeatureExtractor`.

    Returns:
      One dict per text: `text`, `truncated` (longer than `max_len` tokens), and `tokens`,
      one `{"token", "position" (index in the model input; 0 is [CLS]), "features": [{"id",
      "activation", "label"}, ...]}` per document token.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise UserError("give at least one text")
    extractor = FeatureExtractor(sae, minilm_activations(layer, model.params), model.tokenizer,
                                 top, max_len, batch_size, keep_special)
    return extractor(texts, threshold, labels_from_catalog(catalog))


# ----------------------------------------------------------------------------------------
# Benchmark


def _framed_ids(rng, tokenizer, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Random `[CLS] tokens [SEP]` ids (n, length), every slot real."""
    from sae_jax.lm.corpus import Specials

    specials = Specials.of(tokenizer)
    ids = rng.integers(1000, tokenizer.get_vocab_size(), (n, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = specials.cls, specials.sep
    return ids, np.ones_like(ids)


def bench_feature_extraction(sae=None, *, width: int = 3072, arch: str = "topk", k: int = 32,
                             layer: int = 3, n_texts: int = 32, seq_len: int = DEFAULT_MAX_LEN,
                             short_len: int = 16, top: int = DEFAULT_TOP, repeat: int = 5,
                             model_params=None, tokenizer=None, seed: int = 0) -> dict:
    """Latency (one short text) and throughput (a batch) of MiniLM → SAE → top features.

    Args:
      sae: a trained SAE; None builds a fresh one with `saes.init` (`arch`, `width`, `k`,
        float32, input scale 1), so `sae-jax bench` needs no trained run.
      layer: MiniLM layer the SAE reads.
      n_texts, seq_len: the throughput batch.
      short_len: tokens of the latency text (special tokens included).
      top: features kept per token.
      repeat: timed repetitions (the median is reported); the first call (compile) is not
        timed.
      model_params, tokenizer: MiniLM's (default: load the packaged ones).

    Returns:
      `features_latency_ms_per_token`, `features_latency_ms`, `features_tokens_per_s`, the
      shapes, and `features_compile_s` (both shapes).
    """
    from sae_jax.config import make_config
    from sae_jax.lm import minilm
    from sae_jax.sae import SAE

    if sae is None:
        extra = {"k": k} if arch in ("topk", "batchtopk") else {}
        cfg = make_config(arch=arch, width=width, compute_dtype="float32", **extra)
        sae = SAE(cfg, saes.init(jax.random.key(seed), cfg, minilm.D_MODEL), 1.0, 0)
    params = minilm.load_params() if model_params is None else model_params
    tokenizer = minilm.load_tokenizer() if tokenizer is None else tokenizer
    extractor = FeatureExtractor(sae, minilm_activations(layer, params), tokenizer, top,
                                 max(seq_len, short_len), n_texts)
    rng = np.random.default_rng(seed)

    def end_to_end(ids, mask):
        values, idx = extractor.top_features(ids, mask)
        return extractor.collect([""] * len(ids), ids, mask, values, idx, 0.0, {})

    timings, compile_s = {}, 0.0
    for name, (n, length) in (("short", (1, short_len)), ("batch", (n_texts, seq_len))):
        ids, mask = _framed_ids(rng, tokenizer, n, length)
        t0 = time.perf_counter()
        end_to_end(ids, mask)
        compile_s += time.perf_counter() - t0
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            end_to_end(ids, mask)
            runs.append(time.perf_counter() - t0)
        timings[name] = float(np.median(runs))
    return {
        "features_latency_ms_per_token": timings["short"] / short_len * 1e3,
        "features_latency_ms": timings["short"] * 1e3,
        "features_tokens_per_s": n_texts * seq_len / timings["batch"],
        "features_short_len": short_len, "features_batch": [n_texts, seq_len],
        "features_layer": layer, "features_width": int(sae.width), "features_top": top,
        "features_compile_s": round(compile_s, 3),
    }


# ----------------------------------------------------------------------------------------
# `sae-jax features`


def format_table(results: list[dict]) -> str:
    """A readable per-token table: position, token, then `#id activation (label)`."""
    lines = []
    for i, r in enumerate(results, 1):
        lines.append(f"[{i}] {r['text']!r}" + (" (truncated)" if r["truncated"] else ""))
        for t in r["tokens"]:
            feats = "  ".join(f"#{f['id']} {f['activation']:.2f}"
                              + (f" ({f['label']})" if f["label"] else "")
                              for f in t["features"]) or "-"
            lines.append(f"  {t['position']:>4}  {t['token']:<14} {feats}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`sae-jax features RUN_DIR TEXT... [--layer L] [--top N] [--threshold T]`."""
    parser.add_argument("run_dir", help="a trained run on a MiniLM harvest")
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="texts to read features of")
    parser.add_argument("--layer", type=int,
                        help="the layer the run's SAE reads (default: its store's; any other "
                             "layer is refused)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help=f"features per token (default {DEFAULT_TOP})")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="show features with activation above this (default 0)")
    parser.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                        help=f"tokens per text incl. [CLS]/[SEP] (default {DEFAULT_MAX_LEN})")


def run(args) -> dict:
    """Runs `sae-jax features`; prints the per-token table to stderr."""
    from sae_jax.analysis.runs import open_model_run
    from sae_jax.lm import minilm

    if not 2 < args.max_len <= minilm.MAX_POSITIONS:
        raise UserError(f"--max-len must be in 3..{minilm.MAX_POSITIONS}, got {args.max_len}")
    run = open_model_run(args.run_dir, "features", layer=args.layer,
                         hint="use `sae_jax.analysis.features.FeatureExtractor` with your "
                              "own model")
    catalog = find_catalog(args.run_dir)
    if catalog is None:
        print(f"sae-jax: note: no feature catalog in {args.run_dir}, so no labels (run "
              "`sae-jax dashboard` to make one)", file=sys.stderr)
    t0 = time.perf_counter()
    results = extract_features(run.sae, run.model, args.texts, run.layer, args.top,
                               args.threshold, catalog, max_len=args.max_len,
                               keep_special=run.keep_special)
    seconds = time.perf_counter() - t0
    print(format_table(results), file=sys.stderr)
    return {"run": str(args.run_dir), "layer": run.layer, "top": args.top,
            "threshold": args.threshold, "labels": catalog is not None,
            "seconds": round(seconds, 3), "texts": results}
