"""Feature interpretation: one streaming pass over stored activations -> a feature catalog.

`build_catalog(sae, rows)` reads a `RowSpan` in batches, encodes each batch with the SAE and
keeps, per feature, running state of size O(F·k) -- never an (N, F) matrix:

* firing count (-> frequency), sum of activations when active (-> mean), max activation;
* the top-k activating rows: per batch `jax.lax.top_k` over the (F, B) transposed
  activations, merged with the running (F, k) values/rows by a second top-k over the
  concatenation (running entries first, so ties go to the earlier row exactly as a global
  top-k would; the result does not depend on the batch size);
* quantile samples: a uniform random sample (without replacement) of R rows on which the
  feature fired, by *bottom-k / priority sampling*: every (row, feature) pair gets a fixed
  pseudo-random key from an integer hash of (global row index, feature id); the R active
  pairs with the largest keys are kept with the same top-k merge as above. Because the key
  is a function of the pair, not of the visiting order, the sample is identical for any
  batch size. At the end the sample is sorted by activation and cut into `n_quantiles`
  equal-count bins (0-20 %, 20-40 %, ... of the feature's activation distribution, as
  estimated by the sample); `per_quantile` examples evenly spaced within each bin are shown,
  so the dashboard has weak, medium and strong examples next to the top ones;
* a histogram of log10(activation) in fixed bins (`HIST_LO`..`HIST_HI`, `HIST_BINS` bins);
* the tokens it fires on: exact sparse counts of (feature, token id) pairs
  (`token_counts.TokenCounts`); beyond `max_token_pairs` distinct pairs each feature keeps
  its `token_keep` most counted tokens and the header says `top_tokens_exact: false`.

Then contexts: for every example row (top and quantile) the window of `before` tokens before
and `after` tokens after it *within the same document* (rows are in corpus order; a
document's rows share `positions[:, 0]`) is read, only those rows are re-encoded, and the
feature's activation on each token of the window is recorded.

The result is a `FeatureCatalog` (`sae_jax.analysis.catalog`: its fields, and the JSON file
`write_catalog` writes).
"""

from __future__ import annotations

import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.analysis.catalog import CATALOG_VERSION, FeatureCatalog, json_number, token_strings
from sae_jax.analysis.token_counts import TokenCounts
from sae_jax.batches import pad_rows, padded_batches
from sae_jax.data.store import POSITIONS, ROWS, TOKEN_IDS, open_store
from sae_jax.errors import UserError
from sae_jax.lm.hooks import is_causal, store_tokenizer

HIST_LO, HIST_HI, HIST_BINS = -4.0, 4.0, 64
"""Activation histogram: log10(activation) in HIST_BINS equal bins over [HIST_LO, HIST_HI]
(values outside are clipped into the end bins)."""


# ----------------------------------------------------------------------------------------
# The streaming pass


def _hash_keys(rows, feats):
    """A pseudo-random key in [0, 2^24) per (global row, feature) pair (murmur3 finaliser)."""
    h = rows.astype(jnp.uint32)[:, None] * jnp.uint32(0x9E3779B1) ^ (
        feats.astype(jnp.uint32)[None, :] * jnp.uint32(0x85EBCA6B) + jnp.uint32(0x27D4EB2F))
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    # 24 bits, exactly representable in float32: XLA's CPU top-k is ~20x faster on floats.
    return (h >> 8).astype(jnp.float32)


def _merge_top(run_v, run_i, new_v, new_i, k: int):
    """Top-k of the running (F, k) entries followed by the batch's candidates (F, k')."""
    v = jnp.concatenate([run_v, new_v], axis=1)
    i = jnp.concatenate([run_i, new_i], axis=1)
    top_v, pick = jax.lax.top_k(v, k)
    return top_v, jnp.take_along_axis(i, pick, axis=1)


def _make_step(sae, feats: np.ndarray, k: int, n_sample: int):
    """The jitted per-batch update of the device-side running state."""
    feats_dev = jnp.asarray(feats, jnp.int32)
    select_all = len(feats) == sae.width and np.array_equal(feats, np.arange(sae.width))

    def step(sae, state, x, row0, n_valid):
        f = sae.encode_raw(x)
        if not select_all:
            f = f[:, feats_dev]
        b = f.shape[0]
        local = jnp.arange(b, dtype=jnp.int32)
        valid = (local < n_valid)[:, None]
        f = jnp.where(valid, f, 0.0)
        rows = row0 + local
        active = f > 0
        kb = min(k, b)
        tv, ti = jax.lax.top_k(f.T, kb)
        top_v, top_i = _merge_top(state["top_v"], state["top_i"], tv, rows[ti], k)
        keys = jnp.where(active, _hash_keys(rows, feats_dev), -1.0)
        sb = min(n_sample, b)
        sk, si = jax.lax.top_k(keys.T, sb)
        sample_k, sample_i = _merge_top(state["sample_k"], state["sample_i"], sk, rows[si],
                                        n_sample)
        new = {
            "count": state["count"] + active.sum(0, dtype=jnp.int32),
            "sum": state["sum"] + f.sum(0),
            "max": jnp.maximum(state["max"], f.max(0)),
            "top_v": top_v, "top_i": top_i,
            "sample_k": sample_k, "sample_i": sample_i,
        }
        return new, f

    return jax.jit(step, donate_argnums=(1,))


def _init_state(n_feats: int, k: int, n_sample: int) -> dict:
    return {
        "count": jnp.zeros(n_feats, jnp.int32),
        "sum": jnp.zeros(n_feats, jnp.float32),
        "max": jnp.zeros(n_feats, jnp.float32),
        "top_v": jnp.full((n_feats, k), -jnp.inf, jnp.float32),
        "top_i": jnp.full((n_feats, k), -1, jnp.int32),
        "sample_k": jnp.full((n_feats, n_sample), -1.0, jnp.float32),
        "sample_i": jnp.full((n_feats, n_sample), -1, jnp.int32),
    }


def _select_features(width: int, features) -> np.ndarray:
    if features is None:
        return np.arange(width)
    if isinstance(features, (int, np.integer)):
        if not 1 <= features <= width:
            raise UserError(f"features must be in 1..{width}, got {features}")
        return np.arange(int(features))
    feats = np.asarray(list(features), np.int64)
    if feats.ndim != 1 or len(feats) == 0 or feats.min() < 0 or feats.max() >= width:
        raise UserError(f"feature ids must be in 0..{width - 1}")
    return np.unique(feats)


def _default_tokenizer(meta: dict):
    """The tokenizer of a harvested store's token ids: its causal LM's, or MiniLM's."""
    if not meta.get("token_ids"):
        return None
    if not is_causal(meta) and "minilm" not in str(meta.get("model", "")).lower() \
            and "tokenizer" not in meta:
        return None
    return store_tokenizer(meta)


def read_ranges(store, name: str, start: int, rows: np.ndarray) -> np.ndarray:
    """`store`'s array `name` at span-local `rows` (sorted, unique), offset by `start`.

    Reads at most one block per storage chunk (a read decodes whole chunks, so many small
    reads inside one chunk would decode it many times), all through `store.read_many`, so a
    damaged chunk is one clear error."""
    array = getattr(store, name)
    if len(rows) == 0:
        return np.zeros((0, *array.shape[1:]), array.dtype.numpy_dtype)
    which = (start + rows) // store.chunk_rows
    segments = np.split(rows, np.flatnonzero(np.diff(which)) + 1)
    blocks = store.read_many(name, [(start + int(s[0]), start + int(s[-1]) + 1)
                                    for s in segments])
    return np.concatenate([block[s - s[0]] for block, s in zip(blocks, segments)])


def build_catalog(sae, rows, *, tokenizer=None, features=None, top_k: int = 10,
                  n_sample: int = 32, n_quantiles: int = 5, per_quantile: int = 1,
                  n_top_tokens: int = 10, before: int = 8, after: int = 4,
                  batch_size: int = 4096, max_token_pairs: int = 20_000_000,
                  token_keep: int = 256, run: str | None = None,
                  progress: bool = False) -> FeatureCatalog:
    """One streaming pass over `rows` (a `store.RowSpan`) -> a `FeatureCatalog`.

    Args:
      sae: a trained `sae_jax.sae.SAE` (from `sae_jax.load`).
      rows: the rows to interpret; token contexts need the store's `token_ids`/`positions`.
      tokenizer: decodes token ids (`id_to_token`); default: MiniLM's for harvested stores.
      features: None (all), N (features 0..N-1) or an iterable of feature ids.
      top_k: top activating examples per feature.
      n_sample: size of the per-feature uniform sample of active rows (quantile examples).
      n_quantiles, per_quantile: quantile bins of the sample, and examples shown per bin.
      n_top_tokens: most frequent tokens reported per feature.
      before, after: context tokens around each example (same document only).
      batch_size: rows per encode; memory is O(batch_size · F + F · (top_k + n_sample)).
      max_token_pairs, token_keep: bound on the sparse token counts (module docstring).
      run: the run directory, recorded in the header.
      progress: show a progress bar.
    """
    t0 = time.perf_counter()
    store = rows.store
    n = len(rows)
    if n == 0:
        raise UserError("no rows to interpret")
    if rows.d_in != sae.d_in:
        raise UserError(f"the store has d_in={rows.d_in}, but the SAE expects d_in={sae.d_in}")
    if top_k < 1 or n_sample < 1 or batch_size < 1:
        raise UserError("top_k, n_sample and batch_size must be at least 1")
    feats = _select_features(sae.width, features)
    nf = len(feats)
    has_tokens = store.token_ids is not None
    has_pos = store.positions is not None
    if tokenizer is None and has_tokens:
        tokenizer = _default_tokenizer(store.meta)

    step = _make_step(sae, feats, top_k, n_sample)
    state = _init_state(nf, top_k, n_sample)
    hist = np.zeros(nf * HIST_BINS, np.int64)
    tokens = TokenCounts(max_token_pairs, token_keep)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="row", desc="interpret", dynamic_ncols=True)
    for batch in padded_batches(n, batch_size, rows):
        start, m = batch.start, batch.n_valid
        x = batch.arrays[0].astype(np.float32)
        state, f = step(sae, state, jnp.asarray(x), jnp.int32(start), jnp.int32(m))
        f = np.asarray(f)[:m]
        r, c = np.nonzero(f)
        if len(r):
            v = f[r, c]
            b = np.clip(((np.log10(v) - HIST_LO) * (HIST_BINS / (HIST_HI - HIST_LO))),
                        0, HIST_BINS - 1).astype(np.int64)
            hist += np.bincount(c * HIST_BINS + b, minlength=nf * HIST_BINS)
            if has_tokens:
                tok = store.read(TOKEN_IDS, rows.start + start, rows.start + start + m)
                tokens.add(c, tok[r])
        if bar is not None:
            bar.update(m)
    if bar is not None:
        bar.close()
    st = jax.device_get(state)
    pass_s = time.perf_counter() - t0

    # Examples per feature: (feature column, row, kind, quantile bin).
    top_tok = tokens.top(n_top_tokens) if has_tokens else {}
    examples: list[tuple[int, int, str, int]] = []
    for j in range(nf):
        for v, i in zip(st["top_v"][j], st["top_i"][j]):
            if v > 0 and i >= 0:
                examples.append((j, int(i), "top", -1))

    sample_rows = {j: np.sort(st["sample_i"][j][st["sample_k"][j] >= 0]) for j in range(nf)}
    sample_vals = _activations_at(sae, rows, feats, sample_rows, batch_size)
    qrange: dict[tuple[int, int], tuple[float, float]] = {}
    for j in range(nf):
        rs, vs = sample_rows[j], sample_vals[j]
        if len(rs) == 0:
            continue
        order = np.lexsort((rs, vs))
        rs, vs = rs[order], vs[order]
        for q in range(n_quantiles):
            lo = q * len(rs) // n_quantiles
            hi = (q + 1) * len(rs) // n_quantiles
            if hi <= lo:
                continue
            qrange[(j, q)] = (float(vs[lo]), float(vs[hi - 1]))
            picks = np.unique(lo + ((np.arange(per_quantile) + 0.5) * (hi - lo)
                                    / per_quantile).astype(int))
            for p in picks:
                examples.append((j, int(rs[p]), "quantile", q))

    contexts = _contexts(sae, rows, feats, examples, before, after, batch_size,
                         has_pos, has_tokens, tokenizer)

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    header = {
        "format": "sae_jax feature catalog",
        "version": CATALOG_VERSION,
        "model": store.meta.get("model"),
        "layer": store.meta.get("layer"),
        "hook": store.meta.get("hook"),
        "run": str(run) if run is not None else None,
        "step": int(getattr(sae, "step", 0)),
        "arch": sae.config.arch,
        "width": int(sae.width),
        "d_in": int(sae.d_in),
        "data_dir": str(store.path),
        "row_start": int(rows.start),
        "row_stop": int(rows.stop),
        "n_rows": int(n),
        "n_features": int(nf),
        "created": created,
        "top_k": int(top_k),
        "context": [int(before), int(after)],
        "quantile_method": (f"uniform sample of {n_sample} active rows per feature "
                            "(bottom-k hash keys), sorted by activation and cut into "
                            f"{n_quantiles} equal-count bins; {per_quantile} per bin"),
        "top_tokens_exact": bool(tokens.exact),
        "histogram": {"log10_lo": HIST_LO, "log10_hi": HIST_HI, "bins": HIST_BINS},
        "seconds": {"pass": round(pass_s, 3), "total": None},
    }
    by_feature: dict[int, list] = {}
    for ex in examples:
        by_feature.setdefault(ex[0], []).append(ex)
    feats_out = []
    for j, fid in enumerate(feats):
        mine = by_feature.get(j, [])
        count = int(st["count"][j])
        total = float(st["sum"][j])
        top_examples = [contexts[(j, ex[1])] for ex in mine if ex[2] == "top"]
        qgroups = []
        for q in range(n_quantiles):
            exs = [contexts[(j, ex[1])] for ex in mine if ex[2] == "quantile" and ex[3] == q]
            if exs:
                vlo, vhi = qrange[(j, q)]
                qgroups.append({"bin": q, "lo": json_number(q / n_quantiles),
                                "hi": json_number((q + 1) / n_quantiles),
                                "value_lo": json_number(vlo), "value_hi": json_number(vhi),
                                "examples": exs})
        toks = top_tok.get(j, [])
        feats_out.append({
            "id": int(fid),
            "frequency": json_number(count / n),
            "count": count,
            "mean_activation": json_number(total / count) if count else 0.0,
            "max_activation": json_number(st["max"][j]),
            "top_examples": top_examples,
            "quantile_examples": qgroups,
            "top_tokens": [[name, c] for name, (_, c) in
                           zip(token_strings(tokenizer, [t for t, _ in toks]), toks)],
            "top_token_ids": [t for t, _ in toks],
            "activation_histogram": [int(h) for h in hist[j * HIST_BINS:(j + 1) * HIST_BINS]],
            "label": None,
        })
    header["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return FeatureCatalog(header, feats_out)


def _gather_activations(sae, rows, feats, pair_rows: np.ndarray, pair_cols: np.ndarray,
                        batch_size: int) -> np.ndarray:
    """Activation of feature column `pair_cols[p]` on span-local row `pair_rows[p]`, for
    every pair p, re-encoding each needed row once (in batches of `batch_size`)."""
    out = np.zeros(len(pair_rows), np.float32)
    if len(pair_rows) == 0:
        return out
    needed, inverse = np.unique(pair_rows, return_inverse=True)
    feats_dev = jnp.asarray(feats, jnp.int32)

    @jax.jit
    def pick(sae, x, pr, pc):
        return sae.encode_raw(x)[pr, feats_dev[pc]]

    order = np.argsort(inverse, kind="stable")
    inv_sorted = inverse[order]
    for batch in padded_batches(len(needed), batch_size, lambda lo, hi: read_ranges(
            rows.store, ROWS, rows.start, needed[lo:hi])):
        s, m = batch.start, batch.n_valid
        lo, hi = np.searchsorted(inv_sorted, [s, s + m])
        sel = order[lo:hi]
        # Pad the pair list to a power of two so `pick` compiles a handful of times only.
        size = 1 << max(4, int(len(sel) - 1).bit_length())
        pr = pad_rows((inverse[sel] - s).astype(np.int32), size)
        pc = pad_rows(pair_cols[sel].astype(np.int32), size)
        vals = np.asarray(pick(sae, jnp.asarray(batch.arrays[0], jnp.float32), pr, pc))
        out[sel] = vals[:len(sel)]
    return out


def _activations_at(sae, rows, feats, rows_of: dict[int, np.ndarray],
                    batch_size: int) -> dict[int, np.ndarray]:
    """{feature column: activations on its rows} for the given span-local rows."""
    cols = np.concatenate([np.full(len(r), j, np.int64) for j, r in rows_of.items()] or
                          [np.zeros(0, np.int64)])
    rr = np.concatenate([np.asarray(r, np.int64) for r in rows_of.values()] or
                        [np.zeros(0, np.int64)])
    vals = _gather_activations(sae, rows, feats, rr, cols, batch_size)
    out, p = {}, 0
    for j, r in rows_of.items():
        out[j] = vals[p:p + len(r)]
        p += len(r)
    return out


def _contexts(sae, rows, feats, examples, before, after, batch_size, has_pos, has_tokens,
              tokenizer) -> dict[tuple[int, int], dict]:
    """{(feature column, row): example dict} with the same-document token window."""
    store, n = rows.store, len(rows)
    centers = np.array(sorted({ex[1] for ex in examples}), np.int64)
    # Candidate windows, then the document of every candidate row.
    offs = np.arange(-before, after + 1)
    cand = np.unique(np.clip(centers[:, None] + offs[None, :], 0, n - 1)) if len(centers) \
        else np.zeros(0, np.int64)
    if has_pos:
        pos = read_ranges(store, POSITIONS, rows.start, cand)
        doc_of = dict(zip(cand.tolist(), pos[:, 0].tolist()))
        tpos_of = dict(zip(cand.tolist(), pos[:, 1].tolist()))
    else:
        doc_of, tpos_of = {}, {}
    tok_of = {}
    if has_tokens:
        token_ids = read_ranges(store, TOKEN_IDS, rows.start, cand)
        tok_of = dict(zip(cand.tolist(), token_ids.tolist()))
    windows: dict[int, tuple[int, int]] = {}
    for r in centers.tolist():
        lo = hi = r
        if has_pos or has_tokens:
            doc = doc_of.get(r)
            while lo - 1 >= 0 and r - (lo - 1) <= before and doc_of.get(lo - 1) == doc:
                lo -= 1
            while hi + 1 < n and (hi + 1) - r <= after and doc_of.get(hi + 1) == doc:
                hi += 1
        windows[r] = (lo, hi + 1)
    pair_rows, pair_cols, owners = [], [], []
    for ex in examples:
        j, r = ex[0], ex[1]
        lo, hi = windows[r]
        pair_rows.append(np.arange(lo, hi))
        pair_cols.append(np.full(hi - lo, j))
        owners.append((j, r, lo, hi))
    if owners:
        vals = _gather_activations(sae, rows, feats, np.concatenate(pair_rows),
                                   np.concatenate(pair_cols), batch_size)
    out, p = {}, 0
    for j, r, lo, hi in owners:
        acts = vals[p:p + hi - lo]
        p += hi - lo
        if (j, r) in out:
            continue
        out[(j, r)] = {
            "tokens": (token_strings(tokenizer, [tok_of[i] for i in range(lo, hi)])
                       if has_tokens else [f"row {i}" for i in range(lo, hi)]),
            "activations": [json_number(a) for a in acts],
            "highlight_index": int(r - lo),
            "value": json_number(acts[r - lo]),
            "row": int(rows.start + r),
            "doc": int(doc_of[r]) if has_pos else None,
            "pos": int(tpos_of[r]) if has_pos else None,
        }
    return out


def catalog_for_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                    split: str = "all", **kwargs) -> FeatureCatalog:
    """Loads the run's SAE and store (default: the run's training data) and builds a catalog.

    Args:
      split: "all" rows, or "heldout" (the tail `eval` uses), or "train".
      kwargs: passed to `build_catalog`.
    """
    import sae_jax
    from sae_jax.rundir import read_run

    sae = sae_jax.load(run_dir)
    store = open_store(data_dir if data_dir is not None else read_run(run_dir).data_dir)
    if split == "all":
        span = store.span()
    elif split in ("train", "heldout"):
        span = store.split(sae.config.holdout)[0 if split == "train" else 1]
    else:
        raise UserError(f"split must be all, train or heldout, got {split!r}")
    return build_catalog(sae, span, run=str(run_dir), **kwargs)
