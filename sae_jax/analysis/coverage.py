"""Coverage: how much of the model's activations, and of what it computes, the SAE misses.

On the held-out rows (the store's tail, never trained on; at most `max_rows` of them), with
μ the mean of those rows (so the pooled number is exactly `sae-jax eval`'s FVU):

* **per-token unexplained variance** u_t = ‖x_t − x̂_t‖² / ‖x_t − μ‖²: 0 = reconstructed
  exactly, 1 = no better than predicting the mean; reported as quantiles and a histogram
  (values above `U_HI` counted in the last bin). Pooled over all tokens,
  Σ‖x − x̂‖² / Σ‖x − μ‖² = `fvu`.
* **per-document unexplained variance**: the same pooled ratio over each held-out
  document's tokens (pooled rather than a mean of u_t, so tokens that sit close to μ, where
  u_t is a ratio of two small numbers, do not dominate a document), with quantiles, a
  histogram and the worst documents.
* **no-active-feature fraction**: the fraction of tokens on which no feature fires (f = 0):
  those tokens are left entirely to b_dec and the error term.
* **dark matter**: the `n_dark` held-out tokens with the largest unexplained error
  ‖x − x̂‖² (absolute: where the most activation goes unexplained), each with its
  same-document context, the context's per-token `errors`, and as `activations` (what the
  dashboard colours) each token's error in excess of the held-out median error.
* **downstream not explained**: per held-out sequence, 1 − cos(e_spliced, e_clean) of
  MiniLM's sentence embedding with the SAE reconstruction spliced in at the hooked layer
  (`fidelity.downstream_fidelity`'s spliced pass and sequence sample), with its quantiles,
  its mean per document, and the worst sequences. Its mean is `eval`'s `loss_spliced`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.analysis.catalog import json_number, token_strings
from sae_jax.batches import padded_batches

U_HI = 2.0  # per-token/per-document histograms cover [0, U_HI]; larger values go to the top bin
HIST_BINS = 40
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
SNIPPET_TOKENS = 24
SNIPPET_CHARS = 240


@dataclass(frozen=True)
class HeldoutPass:
    """Per held-out token: squared error ‖x − x̂‖², squared deviation ‖x − μ‖², number of
    active features, and (if asked for) the activations of some feature columns."""

    err: np.ndarray
    dev: np.ndarray
    n_active: np.ndarray
    acts: np.ndarray | None


@jax.jit
def _pass_step(sae, mean, x, cols):
    f = sae.encode_raw(x)
    err = jnp.sum(jnp.square(x - sae.reconstruct_raw(x, f)), axis=-1)
    dev = jnp.sum(jnp.square(x - mean), axis=-1)
    return err, dev, jnp.sum(f > 0, axis=-1), f[:, cols]


def heldout_pass(sae, rows, mean: np.ndarray, columns=None, batch: int = 4096) -> HeldoutPass:
    """One pass over `rows` (a `RowSpan`): coverage numbers per token and the activations of
    the feature `columns` (None: none kept)."""
    cols = jnp.asarray(np.zeros(0, np.int64) if columns is None else columns, jnp.int32)
    mean = jnp.asarray(mean, jnp.float32)
    parts = []
    for b in padded_batches(len(rows), batch, rows):
        out = _pass_step(sae, mean, b.arrays[0].astype(np.float32), cols)
        parts.append([np.asarray(o)[:b.n_valid] for o in out])
    err, dev, n_active, acts = (np.concatenate(p) for p in zip(*parts))
    return HeldoutPass(err.astype(np.float64), dev.astype(np.float64), n_active,
                       None if columns is None else acts)


def histogram(values, lo: float, hi: float, bins: int = HIST_BINS) -> dict:
    """Counts in `bins` equal bins over [lo, hi]; values outside are clipped into the end bins."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    idx = np.clip(((v - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1) if len(v) else v
    return {"lo": lo, "hi": hi, "counts": np.bincount(idx.astype(np.int64),
                                                      minlength=bins).tolist()}


def quantiles(values) -> dict:
    """`{"p10": ..., "p50": ..., "mean": ...}` of the non-None values (None if there are none)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return {f"p{round(q * 100)}": None for q in QUANTILES} | {"mean": None}
    return {f"p{round(q * 100)}": float(np.quantile(v, q)) for q in QUANTILES} | {
        "mean": float(v.mean())}


def per_document(err: np.ndarray, dev: np.ndarray, doc: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled unexplained variance per document: `doc` ids, `n_tokens`, `unexplained`."""
    ids, inverse = np.unique(doc, return_inverse=True)
    e = np.bincount(inverse, weights=err)
    d = np.bincount(inverse, weights=dev)
    return {"doc": ids, "n_tokens": np.bincount(inverse),
            "unexplained": e / np.maximum(d, 1e-30)}


def token_window(token_ids: np.ndarray, doc: np.ndarray, i: int, before: int,
                 after: int) -> tuple[int, int]:
    """`[lo, hi)` around row `i` within its document (rows are in corpus order)."""
    lo, hi = i, i + 1
    while lo > 0 and i - lo < before and doc[lo - 1] == doc[i]:
        lo -= 1
    while hi < len(token_ids) and hi - i <= after and doc[hi] == doc[i]:
        hi += 1
    return lo, hi


def dark_matter(hp: HeldoutPass, token_ids: np.ndarray, positions: np.ndarray, row0: int,
                tokenizer, n: int = 20, before: int = 8, after: int = 4) -> list[dict]:
    """The `n` held-out tokens with the largest ‖x − x̂‖², as catalog-style examples (module
    docstring)."""
    doc = positions[:, 0]
    typical = float(np.median(hp.err)) if len(hp.err) else 0.0
    out = []
    for i in np.argsort(-hp.err, kind="stable")[:n]:
        lo, hi = token_window(token_ids, doc, int(i), before, after)
        out.append({"tokens": token_strings(tokenizer, token_ids[lo:hi]),
                    "errors": [json_number(e) for e in hp.err[lo:hi]],
                    "activations": [json_number(max(e - typical, 0.0)) for e in hp.err[lo:hi]],
                    "highlight_index": int(i - lo), "value": json_number(hp.err[i]),
                    "unexplained": json_number(hp.err[i] / max(hp.dev[i], 1e-30)),
                    "n_active": int(hp.n_active[i]), "row": int(row0 + i),
                    "doc": int(doc[i]), "pos": int(positions[i, 1])})
    return out


def token_coverage(hp: HeldoutPass, positions: np.ndarray, token_ids: np.ndarray,
                   row0: int, tokenizer, n_dark: int = 20, n_worst: int = 10) -> dict:
    """The held-out token and document numbers of the module docstring, JSON-friendly."""
    u = hp.err / np.maximum(hp.dev, 1e-30)
    docs = per_document(hp.err, hp.dev, positions[:, 0])
    first = {int(d): int(np.argmax(positions[:, 0] == d)) for d in docs["doc"]}
    worst = np.argsort(-docs["unexplained"], kind="stable")[:n_worst]
    return {
        "n_tokens": int(len(u)),
        "fvu": float(hp.err.sum() / max(hp.dev.sum(), 1e-30)),
        "no_active_fraction": float(np.mean(hp.n_active == 0)),
        "l0_mean": float(hp.n_active.mean()),
        "per_token": {**quantiles(u), "histogram": histogram(u, 0.0, U_HI)},
        "per_document": {"n_documents": int(len(docs["doc"])),
                         **quantiles(docs["unexplained"]),
                         "histogram": histogram(docs["unexplained"], 0.0, U_HI)},
        "worst_documents": [
            {"doc": int(docs["doc"][j]), "n_tokens": int(docs["n_tokens"][j]),
             "unexplained": json_number(docs["unexplained"][j]),
             "text": _snippet(tokenizer, token_ids[first[int(docs["doc"][j])]:][
                 :min(SNIPPET_TOKENS, int(docs["n_tokens"][j]))])}
            for j in worst],
        "dark_matter": dark_matter(hp, token_ids, positions, row0, tokenizer, n_dark),
    }


def downstream_coverage(sae, store, n_sequences: int = 128, seed: int = 0, corpus=None,
                        tokenizer=None, n_worst: int = 10) -> dict:
    """Per-sequence downstream loss 1 − cos(spliced, clean) (module docstring).

    Raises:
      UserError: the store is not a MiniLM harvest or its corpus cannot be rebuilt.
    """
    from sae_jax.analysis.fidelity import downstream_fidelity

    fid = downstream_fidelity(sae, store, n_sequences=n_sequences, seed=seed, corpus=corpus,
                              per_sequence=True)
    seq = fid.pop("per_sequence")
    loss = np.asarray(seq["loss_spliced"], np.float64)
    doc = np.asarray(seq["doc"], np.int64)
    ids, inverse = np.unique(doc, return_inverse=True)
    per_doc = np.bincount(inverse, weights=loss) / np.bincount(inverse)
    worst = np.argsort(-loss, kind="stable")[:n_worst]
    return {
        "fidelity": fid,
        "per_sequence": {**quantiles(loss), "histogram": histogram(loss, 0.0,
                                                                    max(float(loss.max()),
                                                                        1e-6))},
        "per_document": {"n_documents": int(len(ids)), **quantiles(per_doc)},
        "worst_sequences": [{"doc": int(doc[j]), "loss": json_number(loss[j]),
                             "text": _shorten(seq["text"][j])}
                            for j in worst],
    }


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS - 1] + "…"


def _snippet(tokenizer, ids) -> str:
    if tokenizer is None:
        return " ".join(f"<{int(t)}>" for t in ids)
    return tokenizer.decode([int(t) for t in ids])
