"""A labelled sample of a harvested store's held-out rows: what probing and absorption fit on.

The sample is `PROBE_BLOCKS` evenly spread blocks of the held-out rows (the store's tail, which
no SAE trained on), `PROBE_ROWS` rows in all, so it reaches across many documents without
reading the whole tail. Each row is labelled from the corpus the store was harvested from
(`heldout.rebuild_corpus`, checked by its description): the documents owning the rows are
re-read and re-tokenised with the store's tokenizer, now with character offsets, and every
row's stored token id is checked against the rebuilt one (another corpus or tokenizer is one
clear line, never silently wrong labels). `probe_labels` says which label families a corpus
gives. Rows of framing tokens (`keep_special`) carry no label.

Train/test splits are by document (`document_split`): rows of one document are all on one
side, so a probe cannot pass by recognising a document it saw in training.

`load_sample` keeps the last samples it made: `sae-jax evals` scores every run and its random
baselines on the same store, and the corpus is read once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from sae_jax.analysis.heldout import rebuild_corpus
from sae_jax.analysis.probe_labels import (
    PROSE_CLASSES,
    TOKEN_TYPES,
    UNLABELED,
    encode_classes,
    jsonl_record_labels,
    python_char_labels,
    source_file,
    stdlib_package,
    subword_labels,
)
from sae_jax.data.store import POSITIONS, TOKEN_IDS
from sae_jax.errors import UserError
from sae_jax.lm.corpus import NO_POSITION, untruncated_copy
from sae_jax.lm.hooks import check_model_store, store_tokenizer

PROBE_ROWS = 16384
PROBE_BLOCKS = 8
TEST_FRACTION = 0.3
ENCODE_BATCH = 64  # documents per tokenizer call
_CACHE: dict[tuple, ProbeSample] = {}
_CACHE_SIZE = 2


@dataclass(frozen=True, eq=False)
class ProbeSample:
    """Held-out rows with their labels.

    Attributes:
      x: float32 `(n, row width)` the raw rows.
      docs: int64 `(n,)` each row's document index.
      token_ids: int64 `(n,)` each row's token id.
      labels: family -> `(codes int32 (n,), class names)`; code UNLABELED where unknown.
      tokenizer: the store's tokenizer (`id_to_token` gives a row's token string).
      corpus: the corpus description.
    """

    x: np.ndarray
    docs: np.ndarray
    token_ids: np.ndarray
    labels: dict[str, tuple[np.ndarray, list[str]]]
    tokenizer: object
    corpus: str


def sample_ranges(n: int, n_rows: int, blocks: int = PROBE_BLOCKS) -> list[tuple[int, int]]:
    """`blocks` evenly spread `[start, stop)` ranges of `0..n` holding `n_rows` rows in all
    (everything when `n <= n_rows`)."""
    if n <= n_rows:
        return [(0, n)]
    size = -(-n_rows // blocks)
    starts = np.unique(np.linspace(0, n - size, blocks).astype(np.int64))
    return [(int(s), int(s) + size) for s in starts]


def document_split(docs: np.ndarray, seed: int = 0,
                   test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """A boolean test mask over rows: a seeded `test_fraction` of the distinct documents."""
    unique = np.unique(docs)
    rng = np.random.default_rng(seed)
    n_test = max(1, int(round(test_fraction * len(unique)))) if len(unique) > 1 else 0
    test_docs = rng.choice(unique, size=n_test, replace=False)
    return np.isin(docs, test_docs)


def _documents(store, corpus, wanted: set[int]):
    """The corpus's documents with indices in `wanted`, read only up to the last of them."""
    docs = rebuild_corpus(store, corpus)
    last = max(wanted)
    return docs.description, [d for d in itertools.takewhile(lambda d: d.index <= last, docs)
                              if d.index in wanted]


def _encodings(tokenizer, documents) -> list:
    """`tokenizers` encodings (ids and character offsets) of each document, as harvest
    tokenised it (no special tokens, no truncation)."""
    tokenizer = untruncated_copy(tokenizer)
    out = []
    for i in range(0, len(documents), ENCODE_BATCH):
        texts = [d.text for d in documents[i:i + ENCODE_BATCH]]
        out += tokenizer.encode_batch(texts, add_special_tokens=False)
    return out


def label_rows(documents, encodings, docs: np.ndarray, positions: np.ndarray,
               token_ids: np.ndarray, stdlib: bool, where: str) -> dict:
    """Every label family (module `probe_labels`) of each row `(doc, position, token id)`.

    Raises:
      UserError: a rebuilt token differs from the stored one (`where` names the store).
    """
    n = len(docs)
    per_char = {"token_type": np.full(n, UNLABELED, np.int32),
                "prose": np.full(n, UNLABELED, np.int32)}
    by_doc = {d.index: (d, e) for d, e in zip(documents, encodings)}
    unique, inverse = np.unique(docs, return_inverse=True)
    for j, doc_index in enumerate(unique.tolist()):
        rows = np.flatnonzero(inverse == j)
        doc, enc = by_doc[doc_index]
        pos = positions[rows]
        ids = np.asarray(enc.ids, np.int64)
        if pos.max() >= len(ids) or not np.array_equal(ids[pos], token_ids[rows]):
            raise UserError(f"the rebuilt corpus does not match the tokens stored in {where} "
                            "(was it harvested from other text or with another tokenizer?)")
        if stdlib:
            offsets = enc.offsets  # built anew on every access: read once
            found = subword_labels(doc.text, [offsets[p] for p in pos],
                                   python_char_labels(doc.text))
            for name, values in found.items():
                per_char[name][rows] = values
    sources = [by_doc[d][0].source for d in unique.tolist()]
    doc_level: dict[str, list] = {}  # family -> one value per unique document
    labels = {}
    if stdlib:
        labels["token_type"] = (per_char["token_type"], list(TOKEN_TYPES))
        labels["prose"] = (per_char["prose"], list(PROSE_CLASSES))
        doc_level["package"] = [stdlib_package(s) for s in sources]
    else:
        records = _jsonl_records(sources)
        for name in sorted({k for r in records for k in r}):
            doc_level[name] = [r.get(name) for r in records]
        doc_level["file"] = [source_file(s) for s in sources]
    for name, values in doc_level.items():
        codes, classes = encode_classes(values)
        labels[name] = (codes[inverse], classes)
    return labels


def _jsonl_records(sources: list[str]) -> list[dict[str, str]]:
    """The label fields of each document's jsonl record (`{}` for other documents)."""
    wanted: dict[str, set[int]] = {}
    for source in sources:
        path, _, line = source.rpartition(":")
        if path.endswith(".jsonl") and line.isdigit():
            wanted.setdefault(path, set()).add(int(line))
    fields = {path: jsonl_record_labels(path, lines) for path, lines in wanted.items()}
    out = []
    for source in sources:
        path, _, line = source.rpartition(":")
        out.append(fields.get(path, {}).get(int(line), {}) if line.isdigit() else {})
    return out


def make_sample(store, heldout, n_rows: int = PROBE_ROWS, corpus=None) -> ProbeSample:
    """The labelled sample of the held-out span `heldout` (module docstring).

    Raises:
      UserError: the store is not a harvest with token ids and positions, its corpus cannot
        be rebuilt or does not match, or the sample holds no document token.
    """
    check_model_store(store, "probing and absorption", tokens=True)
    ranges = [(heldout.start + a, heldout.start + b)
              for a, b in sample_ranges(len(heldout), n_rows)]
    pos = np.concatenate(store.read_many(POSITIONS, ranges)).astype(np.int64)
    ids = np.concatenate(store.read_many(TOKEN_IDS, ranges)).astype(np.int64)
    keep = pos[:, 1] != NO_POSITION
    if not keep.any():
        raise UserError(f"the held-out rows of {store.path} hold no document token to probe")
    x = np.concatenate(heldout.read_many([(a - heldout.start, b - heldout.start)
                                          for a, b in ranges])).astype(np.float32)[keep]
    pos, ids = pos[keep], ids[keep]
    description, documents = _documents(store, corpus, set(np.unique(pos[:, 0]).tolist()))
    tokenizer = store_tokenizer(store.meta)
    labels = label_rows(documents, _encodings(tokenizer, documents), pos[:, 0], pos[:, 1],
                        ids, description.startswith("python-stdlib"), store.path)
    return ProbeSample(x, pos[:, 0], ids, labels, tokenizer, description)


def load_sample(store, holdout: float, n_rows: int = PROBE_ROWS, corpus=None) -> ProbeSample:
    """`make_sample` of `store.split(holdout)`'s held-out rows, remembered for the next
    caller with the same store and arguments (the last `_CACHE_SIZE` samples)."""
    key = (store.path, store.id, store.n_rows, float(holdout), int(n_rows),
           None if corpus is None else tuple(map(str, np.atleast_1d(corpus))))
    if key not in _CACHE:
        sample = make_sample(store, store.split(holdout)[1], n_rows, corpus)
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = sample
    return _CACHE[key]
