"""The held-out sequences of a harvested store, re-created from its corpus.

What a store holds is rows, not sequences; the downstream measures (`fidelity` for MiniLM,
`loss_recovered` for causal LMs) have to re-run the model on whole sequences the SAE never
trained on. The corpus and its cut into sequences are deterministic, so `heldout_sequences`
rebuilds them: the documents that own held-out rows (the store's tail), cut exactly as
harvest cut them (`corpus.sequences` with the model's framing tokens: MiniLM's
`[CLS] ... [SEP]`, a causal LM's BOS), keeping of a document cut by the train/held-out split
only the sequences wholly after its last training row (sequences past the harvest's last row,
never stored, count as held out too). A sample of them is checked against the stored token
ids wherever the store has them: another corpus or tokenizer is one clear line, not a
silently wrong measurement.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np

from sae_jax.data.store import POSITIONS, TOKEN_IDS
from sae_jax.errors import UserError
from sae_jax.lm.corpus import NO_POSITION, Specials, make_corpus, sequences


@dataclass(frozen=True)
class HeldoutSample:
    """Sampled held-out sequences, sorted by their index among all held-out sequences.

    Attributes:
      ids: int32 `(n, seq_len)` token ids, framed and padded as harvest framed them.
      mask: int32 `(n, seq_len)`, 1 on framing and document tokens, 0 on padding.
      positions: int64 `(n, seq_len)`, each token's position in its document, `NO_POSITION`
        on framing tokens and padding.
      docs: int64 `(n,)`, each sequence's document index.
      n_documents: documents with held-out rows.
    """

    ids: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    docs: np.ndarray
    n_documents: int


def rebuild_corpus(store, corpus):
    """The store's corpus rebuilt (default stdlib, or `corpus` paths), checked by description."""
    docs = make_corpus(corpus)
    want = store.meta.get("corpus")
    if docs.description != want:
        hint = ("pass the corpus paths it was harvested from" if corpus is None else
                "these paths are not the corpus the store was harvested from")
        raise UserError(f"cannot rebuild the corpus of store {store.path}: it was harvested "
                        f"from {want!r}, not {docs.description!r}; {hint}")
    return docs


def _heldout_documents(store, heldout) -> tuple[np.ndarray, tuple[int, int], dict]:
    """The sorted indices of the documents with held-out rows; `(doc, pos)` of the last
    training row (the held-out part of a document cut by the split starts after it; (-1, -1)
    if nothing precedes); and the held-out rows' (doc, pos) keys and token ids (to check the
    rebuilt sequences against the store)."""
    start, stop = heldout.start, heldout.stop
    pos = np.asarray(store.read(POSITIONS, start, stop), np.int64)
    ids = np.asarray(store.read(TOKEN_IDS, start, stop), np.int64)
    boundary = (-1, -1)
    if start > 0:
        b = store.read(POSITIONS, start - 1, start)[0]
        boundary = (int(b[0]), int(b[1]))
    return np.unique(pos[:, 0]), boundary, {"keys": pos[:, 0] * (1 << 32) + pos[:, 1],
                                            "ids": ids}


def _check_tokens(store, stored: dict, ids, positions, docs) -> None:
    """Refuses rebuilt sequences whose tokens differ from the stored ones where both exist."""
    real = positions != NO_POSITION
    keys = (docs[:, None] * (1 << 32) + positions)[real]
    order = np.argsort(stored["keys"], kind="stable")
    at = np.searchsorted(stored["keys"], keys, sorter=order)
    found = at < len(order)
    hit = order[np.minimum(at, len(order) - 1)]
    found &= stored["keys"][hit] == keys
    if not np.array_equal(stored["ids"][hit[found]], ids[real][found]):
        raise UserError(f"the rebuilt corpus does not match the tokens stored in {store.path} "
                        "(was it harvested from other text or with another tokenizer?)")


def heldout_sequences(store, heldout, tokenizer, specials: Specials, n_sequences: int,
                      seed: int = 0,
                      corpus: None | str | os.PathLike | list = None) -> HeldoutSample:
    """A deterministic sample of the held-out sequences of a harvested store (module
    docstring).

    Args:
      store: an opened store made by `sae-jax harvest` (`seq_len`, `corpus` in its meta).
      heldout: its held-out `RowSpan` (`store.split(holdout)[1]`).
      tokenizer: the tokenizer harvest used (MiniLM's, or the causal LM's).
      specials: the framing tokens harvest used (`Specials.of(tokenizer)` for MiniLM,
        `model.specials` for a causal LM).
      n_sequences: sequences to sample (all of them if there are fewer); at least 1.
      seed: picks the sample.
      corpus: the `--corpus` paths the store was harvested from (None: the stdlib default).

    Raises:
      UserError: n_sequences < 1, the corpus cannot be rebuilt or does not match the stored
        tokens, or no whole held-out sequence exists.
    """
    if n_sequences < 1:
        raise UserError(f"n_sequences must be at least 1, got {n_sequences}")
    seq_len = int(store.meta["seq_len"])
    docs = rebuild_corpus(store, corpus)
    doc_ids, boundary, stored = _heldout_documents(store, heldout)

    # Re-create every sequence of the held-out documents (read the corpus only up to them).
    wanted = set(doc_ids.tolist())
    last = int(doc_ids[-1])
    held_docs = (d for d in itertools.takewhile(lambda d: d.index <= last, docs)
                 if d.index in wanted)
    # A document cut by the split: only its sequences wholly after the last training row.
    seqs = [s for s in sequences(held_docs, tokenizer, seq_len, specials=specials)
            if s.doc != boundary[0] or s.positions[s.positions != NO_POSITION].min()
            > boundary[1]]
    if not seqs:
        raise UserError(f"the held-out rows of {store.path} hold no whole sequence (too few "
                        "rows held out?)")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(seqs), size=min(n_sequences, len(seqs)), replace=False))
    ids = np.stack([seqs[i].input_ids for i in pick]).astype(np.int32)
    mask = np.stack([seqs[i].attention_mask for i in pick]).astype(np.int32)
    positions = np.stack([seqs[i].positions for i in pick]).astype(np.int64)
    doc_of = np.array([seqs[i].doc for i in pick], np.int64)
    _check_tokens(store, stored, ids, positions, doc_of)
    return HeldoutSample(ids, mask, positions, doc_of, int(len(doc_ids)))
