"""A bundle's `contexts.npz`: a seeded sample of the catalog's top activations, each with the
whole sequence the model saw when it was harvested, so an auditor who holds the model can
re-derive every recorded value (`rederive`) without the activation store.

Arrays (`np.load(..., allow_pickle=False)`), one entry per sampled example:

    ids       int32 (n, seq_len)  the harvested sequence, framed as harvest framed it (MiniLM
                                  [CLS] tokens [SEP] then padding; a causal LM BOS first)
    mask      int32 (n, seq_len)  1 on framing and document tokens, 0 on padding
    position  int32 (n,)          the example's token within the sequence
    feature   int32 (n,)          the feature
    value     float32 (n,)        the catalog's recorded activation (catalog.json's `value`)
    row       int64 (n,)          the example's store row (to find it in the catalog)

The sequence is re-created from the store's `token_ids` and `positions` (harvest cuts each
document's tokens into bodies of seq_len minus the framing tokens, so the body holding
document position p starts at p - p % body). An example whose sequence the store does not
hold whole (the harvest's last, cut-off sequence) is not sampled: a bidirectional model's
activations depend on the tokens after it.
"""

from __future__ import annotations

import functools
import zipfile

import numpy as np

from sae_jax.data.store import POSITIONS, TOKEN_IDS
from sae_jax.errors import UserError
from sae_jax.lm.corpus import NO_POSITION, Specials
from sae_jax.lm.hooks import is_causal

ARRAYS = ("ids", "mask", "position", "feature", "value", "row")
RTOL, ATOL = 1e-3, 1e-4
"""A re-derived activation matches when |got − value| ≤ ATOL + RTOL·|value| (float32 model and
SAE; the catalog rounds values to 6 significant digits)."""


def store_specials(meta: dict) -> Specials:
    """The framing tokens harvest used for this store: a causal LM's BOS (and pad) from the
    ids it recorded, MiniLM's [CLS]/[SEP]/[PAD] from its tokenizer."""
    ids = (meta.get("tokenizer") or {}).get("special_ids") or {}
    if is_causal(meta):
        return Specials(ids.get("bos"), None, ids.get("pad") or 0)
    from sae_jax.lm import minilm

    return Specials.of(minilm.load_tokenizer())


def top_examples(catalog) -> list[tuple[int, int, float]]:
    """`(feature, store row, recorded value)` of every positive top example of the catalog."""
    out = []
    for entry in catalog.features:
        for ex in entry.get("top_examples") or []:
            if ex.get("row") is not None and ex.get("value", 0) > 0:
                out.append((int(entry["id"]), int(ex["row"]), float(ex["value"])))
    return out


def _sequence(pos: np.ndarray, tok: np.ndarray, at: int, body: int):
    """The document tokens of the harvested sequence holding window row `at` and the row's
    index among them, or None when the window does not show all of them. `pos` (m, 2) and
    `tok` (m,) are a window of store rows reaching at least seq_len rows either side."""
    doc, p = int(pos[at, 0]), int(pos[at, 1])
    if p == NO_POSITION:
        return None  # a framing token's own row (keep_special): not re-created
    start = p - p % body
    rows = np.flatnonzero((pos[:, 0] == doc) & (pos[:, 1] >= start) & (pos[:, 1] < start + body))
    if not np.array_equal(pos[rows, 1], np.arange(start, start + len(rows))):
        return None
    # A short body is the document's end only if a later document token is stored (else the
    # harvest stopped inside this sequence).
    if len(rows) < body and not np.any(pos[rows[-1] + 1:, 1] != NO_POSITION):
        return None
    return tok[rows], p - start


def build_contexts(store, catalog, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`contexts.npz`'s arrays: up to `n` top examples of `catalog`, sampled with `seed`,
    each with its re-created sequence (module docstring).

    Raises:
      UserError: the store has no token ids/positions or sequence length (not a harvest).
    """
    meta = store.meta
    if store.token_ids is None or store.positions is None or "seq_len" not in meta:
        raise UserError(f"store {store.path} has no token ids, positions or seq_len: the "
                        "contexts of a bundle need a store made by `sae-jax harvest`")
    seq_len = int(meta["seq_len"])
    specials = store_specials(meta)
    body = seq_len - specials.count
    head = [specials.cls] if specials.cls is not None else []
    tail = [specials.sep] if specials.sep is not None else []
    examples = top_examples(catalog)
    order = np.random.default_rng(seed).permutation(len(examples))
    out = {k: [] for k in ARRAYS}
    reach = seq_len + 1  # rows either side that can belong to the example's sequence
    for i in order:
        if len(out["row"]) >= n:
            break
        feature, row, value = examples[i]
        lo, hi = max(0, row - reach), min(store.n_rows, row + reach + 1)
        pos = np.asarray(store.read(POSITIONS, lo, hi), np.int64)
        tok = np.asarray(store.read(TOKEN_IDS, lo, hi), np.int64)
        found = _sequence(pos, tok, row - lo, body)
        if found is None:
            continue
        tokens, index = found
        framed = head + tokens.tolist() + tail
        ids = np.full(seq_len, specials.pad, np.int32)
        ids[:len(framed)] = framed
        mask = np.zeros(seq_len, np.int32)
        mask[:len(framed)] = 1
        for key, v in (("ids", ids), ("mask", mask), ("position", len(head) + index),
                       ("feature", feature), ("value", value), ("row", row)):
            out[key].append(v)
    dtypes = {"ids": np.int32, "mask": np.int32, "position": np.int32, "feature": np.int32,
              "value": np.float32, "row": np.int64}
    shape = {"ids": (0, seq_len), "mask": (0, seq_len)}
    return {k: (np.asarray(v, dtypes[k]) if v else np.zeros(shape.get(k, (0,)), dtypes[k]))
            for k, v in out.items()}


def read_contexts(path) -> dict[str, np.ndarray]:
    """contexts.npz's arrays, checked for names, dtypes and shapes. Raises ValueError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read contexts.npz: {type(e).__name__}: {e}") from None
    if sorted(arrays) != sorted(ARRAYS):
        raise ValueError(f"contexts.npz holds {sorted(arrays)}, expected {sorted(ARRAYS)}")
    n = len(arrays["value"])
    ids = arrays["ids"]
    if ids.ndim != 2 or arrays["mask"].shape != ids.shape or ids.shape[0] != n or any(
            arrays[k].shape != (n,) for k in ("position", "feature", "value", "row")):
        raise ValueError("contexts.npz arrays have inconsistent shapes")
    if any(arrays[k].dtype.kind not in "iu" for k in ARRAYS if k != "value"):
        raise ValueError("contexts.npz: ids, mask, position, feature and row must be integers")
    if n and not (0 <= arrays["position"].min() and arrays["position"].max() < ids.shape[1]):
        raise ValueError("contexts.npz: a position lies outside its sequence")
    return arrays


def against_catalog(contexts: dict, catalog) -> list[str]:
    """Each context's recorded value must be the catalog's value of that (feature, row) top
    example, exactly as float32: one line per disagreement (editing either file is caught)."""
    recorded = {(f, r): np.float32(v) for f, r, v in top_examples(catalog)}
    bad = []
    for f, r, v in zip(contexts["feature"].tolist(), contexts["row"].tolist(),
                       contexts["value"]):
        want = recorded.get((f, r))
        if want is None:
            bad.append(f"feature {f} row {r}: not a top example of the catalog")
        elif want != np.float32(v):
            bad.append(f"feature {f} row {r}: contexts.npz says {float(v):.6g}, the catalog "
                       f"{float(want):.6g}")
    return bad


@functools.cache
def _model_call():
    """`fn(ids, mask)` jitted with `fn` (a `Partial` over the weights) as an argument, one
    program per model and shape for the whole process."""
    import jax

    return jax.jit(lambda fn, ids, mask: fn(ids, mask))


def rederive(contexts: dict, activations_fn, sae, dtype=np.float32,
             batch: int = 16) -> tuple[np.ndarray, list[str]]:
    """Re-runs the model (`activations_fn(ids, mask) -> (n, L, d)`, e.g. a `Partial` from
    `hooks.minilm_activations`) and the SAE on the contexts: `(re-derived values, one line per
    example off by more than ATOL + RTOL·|value|)`. The model's activations are rounded to
    the store's `dtype` first, as harvest stored them."""
    import jax.numpy as jnp

    from sae_jax.batches import padded_batches

    run = _model_call()
    ids, mask, position = contexts["ids"], contexts["mask"], contexts["position"]
    rows = []
    for b in padded_batches(len(ids), batch, ids, mask, position, attend=1):
        h = run(activations_fn, jnp.asarray(b.arrays[0]), jnp.asarray(b.arrays[1]))
        at = np.asarray(b.arrays[2], np.int64)
        rows.append(np.asarray(h[jnp.arange(len(at)), jnp.asarray(at)],
                               np.float32)[:b.n_valid])
    if not rows:
        return np.zeros(0, np.float32), []
    x = np.concatenate(rows).astype(dtype).astype(np.float32)[:, :sae.d_in]
    f = np.asarray(sae.encode(x))
    got = f[np.arange(len(x)), contexts["feature"]]
    want = contexts["value"].astype(np.float32)
    off = np.abs(got - want) > ATOL + RTOL * np.abs(want)
    bad = [f"feature {int(contexts['feature'][i])} row {int(contexts['row'][i])}: fires "
           f"{got[i]:.6g}, recorded {want[i]:.6g}" for i in np.flatnonzero(off)]
    return got, bad
