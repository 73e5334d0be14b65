"""A reference-free detector of poisoned features: latents that look planted, from one SAE.

Poisoning plants a trigger (a rare phrase) with a consistent payload in a small fraction of
the training documents; an SAE trained on them may spend a latent on it. No clean reference
SAE is needed to look for such latents: one streamed pass over a store's rows (with its
`token_ids` and `positions`) gives, per latent, its activation mass in every document and its
strongest row in each, and three signals are read from that:

(a) **Few documents.** `top_share`: the share of the latent's total activation mass in its
    `top_docs` heaviest documents, and `doc_lift`: `top_share` over those documents' share of
    the scanned rows (a latent that fires alike on every token has lift 1, however long the
    documents). Also reported: `effective_docs` = exp(entropy) of its per-document mass.
    Flagged when `top_share >= doc_share` and `doc_lift >= doc_lift`. A trigger planted in
    one or two documents fires there only; a natural feature spreads over many, or sits in
    documents that hold much of the text anyway (one huge module).
(b) **A repeated n-gram.** The latent's strongest row in each of the `ngram_contexts`
    documents where it fires strongest (its top activations, one per document) is a
    context; the `ngram`-token windows of the document that contain that row are its
    n-grams. The n-gram found in the most contexts is the latent's n-gram, `ngram_share` the
    fraction of contexts that hold it and `ngram_lift` that share divided by the fraction of
    all scanned documents holding it (what chance would give). Flagged when it is in at
    least `min_ngram_docs` contexts, `ngram_share >= ngram_share` and `ngram_lift >=
    ngram_lift`: the same long exact token sequence under the latent's top activations in
    many documents, far more often than the corpus repeats it.
(c) **Outlying density.** Robust z-scores (median, 1.4826 MAD) over the scored latents of
    log10 firing frequency (both tails) and of log10 max activation (high tail). Flagged when
    the largest |z| reaches `z`.

Latents firing on fewer than `min_count` rows are not scored. A latent is flagged when at
least `min_reasons` of (a)-(c) hold; flagged latents are ranked by
`score = top_share + ngram_share + min(1, max|z| / (2 z))` (each term in [0, 1]; higher is
more suspicious), reasons listed. `detect` is pure (arrays in, report dict out);
`scan_store` is the streamed pass over a `RowSpan`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields

import numpy as np

from sae_jax.analysis.catalog import token_strings
from sae_jax.errors import UserError

MAD_SCALE = 1.4826  # MAD of a normal distribution -> its standard deviation
N_LISTED = 50  # flagged latents listed in the report at most


@dataclass(frozen=True)
class Thresholds:
    """The detector's thresholds (module docstring; `sae-jax audit --help`)."""

    top_docs: int = 3
    doc_share: float = 0.9
    doc_lift: float = 10.0
    ngram: int = 6
    ngram_contexts: int = 20
    min_ngram_docs: int = 3
    ngram_share: float = 0.5
    ngram_lift: float = 3.0
    z: float = 5.0
    min_count: int = 10
    min_reasons: int = 1

    def __post_init__(self):
        for name in ("top_docs", "ngram", "ngram_contexts", "min_ngram_docs", "min_count",
                     "min_reasons"):
            if getattr(self, name) < 1:
                raise UserError(f"poisoning {name} must be at least 1, got "
                                f"{getattr(self, name)}")
        for name in ("doc_share", "ngram_share"):
            if not 0 < getattr(self, name) <= 1:
                raise UserError(f"poisoning {name} must be in (0, 1], got "
                                f"{getattr(self, name)}")
        if self.z <= 0 or self.ngram_lift <= 0 or self.doc_lift <= 0:
            raise UserError("poisoning z, doc_lift and ngram_lift must be positive")


@dataclass(frozen=True)
class DocumentMass:
    """Per (latent, document) pair that fired: activation mass and strongest row.

    Attributes:
      feature, doc: the pairs, sorted by (feature, doc).
      mass: summed activation of the latent over the document's rows.
      best_row, best_value: the document's row where the latent is strongest, and that value.
      count: rows each latent fired on, (F,); max_activation (F,); n_rows scanned.
    """

    feature: np.ndarray
    doc: np.ndarray
    mass: np.ndarray
    best_row: np.ndarray
    best_value: np.ndarray
    count: np.ndarray
    max_activation: np.ndarray
    n_rows: int


class MassAccumulator:
    """Sparse (latent, document) mass and strongest row, merged batch by batch.

    Only pairs that fire are kept (at most N·L0 of them, in practice far fewer)."""

    def __init__(self, width: int):
        self.width = width
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.count = np.zeros(width, np.int64)
        self.max = np.zeros(width, np.float64)
        self.n_rows = 0

    def add(self, acts: np.ndarray, docs: np.ndarray, row0: int) -> None:
        """`acts` (B, F) activations of rows `row0..row0+B` of documents `docs` (B,)."""
        r, c = np.nonzero(acts > 0)
        v = acts[r, c].astype(np.float64)
        self.count += np.bincount(c, minlength=self.width)
        np.maximum.at(self.max, c, v)
        self.n_rows += len(acts)
        real = docs[r] >= 0
        r, c, v = r[real], c[real], v[real]
        self.parts.append(self._reduce((c.astype(np.int64) << 32) | docs[r].astype(np.int64),
                                       v, v, r.astype(np.int64) + row0))
        if len(self.parts) > 16:
            self.parts = [self._reduce(*map(np.concatenate, zip(*self.parts)))]

    @staticmethod
    def _reduce(keys, mass, value, rows):
        if len(keys) == 0:
            return keys, mass, value, rows
        order = np.lexsort((-value, keys))
        keys, mass, value, rows = keys[order], mass[order], value[order], rows[order]
        first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        return keys[first], np.add.reduceat(mass, first), value[first], rows[first]

    def result(self) -> DocumentMass:
        parts = self.parts or [(np.zeros(0, np.int64),) + (np.zeros(0),) * 2
                               + (np.zeros(0, np.int64),)]
        keys, mass, value, rows = self._reduce(*map(np.concatenate, zip(*parts)))
        return DocumentMass(keys >> 32, keys & 0xFFFFFFFF, mass, rows, value, self.count,
                            self.max, self.n_rows)


def document_mass(acts: np.ndarray, positions: np.ndarray) -> DocumentMass:
    """`DocumentMass` of a dense (N, F) activation matrix with positions (N, 2)."""
    acc = MassAccumulator(acts.shape[1])
    acc.add(np.asarray(acts), np.asarray(positions)[:, 0], 0)
    return acc.result()


def scan_store(sae, rows, batch_size: int = 4096, max_rows: int | None = None):
    """The streamed pass: `(DocumentMass, token_ids, positions)` of the first `max_rows` rows
    of `rows` (a `RowSpan` of a store with token ids and positions)."""
    import jax

    from sae_jax.batches import padded_batches
    from sae_jax.data.store import POSITIONS, TOKEN_IDS

    store = rows.store
    if store.token_ids is None or store.positions is None:
        raise UserError(f"the poisoning detector needs the token ids and positions of store "
                        f"{store.path} (harvest it with `sae-jax harvest`)")
    n = len(rows) if max_rows is None else min(len(rows), max_rows)
    if n == 0:
        raise UserError("no rows to scan for poisoned features")
    token_ids = np.asarray(store.read(TOKEN_IDS, rows.start, rows.start + n), np.int64)
    positions = np.asarray(store.read(POSITIONS, rows.start, rows.start + n), np.int64)
    encode = jax.jit(lambda sae, x: sae.encode_raw(x))
    acc = MassAccumulator(int(sae.width))
    for batch in padded_batches(n, batch_size, rows):
        m = batch.n_valid
        f = np.asarray(encode(sae, batch.arrays[0].astype(np.float32)))[:m]
        acc.add(f, positions[batch.start:batch.start + m, 0], batch.start)
    return acc.result(), token_ids, positions


# ----------------------------------------------------------------------------------------
# The signals


def ngram_hashes(token_ids: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    """(N,) hash of the `n` tokens starting at each row (-1 where they leave the document or
    the stream): a wrapping polynomial hash, so equal n-grams share a value."""
    token_ids, positions = np.asarray(token_ids), np.asarray(positions)
    size = len(token_ids)
    out = np.full(size, -1, np.int64)
    if size < n:
        return out
    m = size - n + 1
    h = np.zeros(m, np.uint64)
    ok = positions[:m, 1] >= 0
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(1_000_003) + token_ids[j:j + m].astype(np.uint64) + np.uint64(1)
            if j:
                ok &= (positions[j:j + m, 0] == positions[:m, 0]) & \
                      (positions[j:j + m, 1] == positions[:m, 1] + j)
    out[:m] = np.where(ok, (h >> np.uint64(1)).astype(np.int64), -1)
    return out


def _robust_z(x: np.ndarray) -> np.ndarray:
    med = np.median(x)
    mad = MAD_SCALE * np.median(np.abs(x - med))
    return (x - med) / mad if mad > 0 else np.zeros_like(x)


def _feature_ngram(rows: np.ndarray, hashes: np.ndarray, n: int) -> tuple[int, int, int]:
    """(hash, contexts holding it, a row where it starts) of the n-gram found around the
    most of `rows`; (-1, 0, -1) if none."""
    seen: dict[int, int] = {}
    start_of: dict[int, int] = {}
    for r in rows:
        lo = max(0, r - n + 1)
        hs = hashes[lo:r + 1]
        for h in np.unique(hs[hs >= 0]).tolist():
            seen[h] = seen.get(h, 0) + 1
            start_of.setdefault(h, lo + int(np.flatnonzero(hs == h)[0]))
    if not seen:
        return -1, 0, -1
    best = max(seen, key=lambda h: (seen[h], -h))
    return best, seen[best], start_of[best]


def detect(mass: DocumentMass, token_ids: np.ndarray, positions: np.ndarray,
           thresholds: Thresholds = Thresholds(), tokenizer=None) -> dict:
    """The detector (module docstring) on a scanned pass: the report's `poisoning` dict.

    Returns `{"flagged": [{"feature", "score", "reasons", "top_documents", "ngram",
    "effective_docs", "count", ...}], "n_flagged", "n_scored", "n_rows", "n_documents",
    "thresholds"}` with flagged latents most suspicious first (at most `N_LISTED`)."""
    t = thresholds
    docs = np.asarray(positions)[:, 0]
    doc_ids, doc_rows = np.unique(docs[docs >= 0], return_counts=True)
    n_documents = int(len(doc_ids))
    hashes = ngram_hashes(token_ids, positions, t.ngram)
    valid = hashes >= 0
    doc_hash = np.unique(np.stack([docs[valid], hashes[valid]], 1), axis=0)
    uniq_hash, doc_freq = np.unique(doc_hash[:, 1], return_counts=True)
    scored = np.flatnonzero(mass.count >= t.min_count)
    z_density = np.zeros(len(mass.count))
    z_max = np.zeros(len(mass.count))
    if len(scored):
        z_density[scored] = _robust_z(np.log10(mass.count[scored] / max(mass.n_rows, 1)))
        z_max[scored] = _robust_z(np.log10(mass.max_activation[scored]))
    bounds = np.searchsorted(mass.feature, np.arange(len(mass.count) + 1))
    out = []
    for f in scored:
        lo, hi = bounds[f], bounds[f + 1]
        m = mass.mass[lo:hi]
        total = float(m.sum())
        order = np.argsort(-mass.best_value[lo:hi], kind="stable")
        heavy = np.argsort(-m, kind="stable")
        top_share = float(m[heavy[:t.top_docs]].sum() / total) if total > 0 else 0.0
        their_rows = doc_rows[np.searchsorted(doc_ids, mass.doc[lo:hi][heavy[:t.top_docs]])]
        doc_lift = top_share / max(their_rows.sum() / max(len(docs), 1), 1e-12)
        p = m[m > 0] / total if total > 0 else np.ones(1)
        effective = float(np.exp(-(p * np.log(p)).sum()))
        ctx_rows = mass.best_row[lo:hi][order[:t.ngram_contexts]]
        h, in_ctx, start = _feature_ngram(ctx_rows, hashes, t.ngram)
        share = in_ctx / max(len(ctx_rows), 1)
        chance = (doc_freq[np.searchsorted(uniq_hash, h)] / max(n_documents, 1)
                  if h >= 0 else 1.0)
        lift = share / chance
        zs = {"density": float(z_density[f]), "max_activation": float(max(z_max[f], 0.0))}
        reasons = []
        if top_share >= t.doc_share and doc_lift >= t.doc_lift:
            reasons.append(f"documents: {top_share:.0%} of its activation mass in its top "
                           f"{min(t.top_docs, hi - lo)} of {hi - lo} documents, {doc_lift:.0f}x "
                           f"their share of the rows (effective {effective:.1f})")
        if in_ctx >= t.min_ngram_docs and share >= t.ngram_share and lift >= t.ngram_lift:
            reasons.append(f"ngram: {in_ctx} of its top {len(ctx_rows)} documents share one "
                           f"{t.ngram}-token sequence ({lift:.0f}x the corpus rate)")
        for name, z in zs.items():
            if abs(z) >= t.z:
                reasons.append(f"{name}: robust z {z:+.1f}")
        max_z = max(abs(z) for z in zs.values())
        score = top_share + share + min(1.0, max_z / (2 * t.z))
        if len(reasons) < t.min_reasons:
            continue
        ngram = None
        if h >= 0:
            ngram = {"tokens": token_strings(tokenizer, token_ids[start:start + t.ngram]),
                     "contexts": int(in_ctx), "share": round(share, 4),
                     "lift": round(float(lift), 2)}
        out.append({
            "feature": int(f), "score": round(float(score), 4), "reasons": reasons,
            "top_documents": [[int(mass.doc[lo + i]), round(float(m[i] / total), 4)]
                              for i in heavy[:t.top_docs]],
            "ngram": ngram, "top_share": round(top_share, 4),
            "doc_lift": round(float(doc_lift), 2),
            "effective_docs": round(effective, 2), "n_documents": int(hi - lo),
            "count": int(mass.count[f]), "z": {k: round(v, 2) for k, v in zs.items()},
            "top_rows": [int(r) for r in mass.best_row[lo:hi][order[:5]]]})
    out.sort(key=lambda d: (-d["score"], d["feature"]))
    return {"flagged": out[:N_LISTED], "n_flagged": len(out),
            "flagged_features": [d["feature"] for d in out], "n_scored": int(len(scored)),
            "n_rows": int(mass.n_rows), "n_documents": n_documents,
            "thresholds": asdict(thresholds)}


def detect_on_store(sae, rows, thresholds: Thresholds = Thresholds(), tokenizer=None,
                    max_rows: int | None = None, batch_size: int = 4096) -> dict:
    """`scan_store` then `detect`: the detector on a store's rows; also records the rows."""
    mass, token_ids, positions = scan_store(sae, rows, batch_size, max_rows)
    report = detect(mass, token_ids, positions, thresholds, tokenizer)
    report["rows"] = [int(rows.start), int(rows.start + mass.n_rows)]
    return report


# ----------------------------------------------------------------------------------------
# Command-line options (used by `sae-jax audit`)

_HELP = {
    "top_docs": "(a) documents whose share of a latent's activation mass is measured",
    "doc_share": "(a) flag when that share reaches this",
    "doc_lift": "(a) ... and that share over those documents' share of the rows reaches this",
    "ngram": "(b) n-gram length in tokens",
    "ngram_contexts": "(b) top documents (contexts) examined per latent",
    "min_ngram_docs": "(b) contexts that must hold the n-gram",
    "ngram_share": "(b) fraction of contexts that must hold it",
    "ngram_lift": "(b) that fraction over the fraction of all documents holding it",
    "z": "(c) robust z of log density / log max activation that flags",
    "min_count": "latents firing on fewer rows are not scored",
    "min_reasons": "signals (a)-(c) needed to flag a latent",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--poison-<name>` options for every `Thresholds` field (dest `poison_<name>`)."""
    d = Thresholds()
    group = parser.add_argument_group("poisoning detector (sae_jax.analysis.poisoning)")
    for f in fields(Thresholds):
        default = getattr(d, f.name)
        group.add_argument(f"--poison-{f.name.replace('_', '-')}", type=type(default),
                           default=default, dest=f"poison_{f.name}",
                           metavar="N" if isinstance(default, int) else "X",
                           help=f"{_HELP[f.name]} (default {default:g})")


def thresholds_from_args(args) -> Thresholds:
    """The `Thresholds` the `--poison-*` options set."""
    return Thresholds(**{f.name: getattr(args, f"poison_{f.name}") for f in fields(Thresholds)})
