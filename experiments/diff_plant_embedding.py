"""The embedding design of `diff_minilm.py --plant embedding`: changes planted in the word
embeddings of a copy of MiniLM.

- *added* (expected B-only): `N_ADDED` seeded random sets T_j of `SET_SIZE` of the corpus's
  `POOL` commonest tokens (`choose_sets`); every token's embedding row gets `strength` x (the
  set's mean row norm) x u_j, u_j a seeded random unit direction (orthogonalised across
  sets). The tuned model has a direction on T_j that the base lacks;
- *removed* (expected A-only): the `SET_SIZE` common tokens furthest along the embeddings'
  first (frequency-weighted) principal direction (`principal_set`) lose the component of each
  row along their shared direction (their mean row minus the vocabulary's mean row): the
  base uses that direction on them, the tuned model does not.

Sets of hundreds of unrelated tokens, because a change on a few tokens is absorbed by those
tokens' own latents (each shared latent's two decoders simply differ a little), so no latent
is exclusive: measured with sets of 60 tokens and the number tokens.

*Rows of a change*: the rows of its set's tokens.
"""

from __future__ import annotations

import numpy as np

N_ADDED, SET_SIZE, POOL = 2, 600, 3000  # 2 random sets of 600 of the 3000 commonest tokens
STRENGTH = 0.5
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def corpus_counts(tokenizer, tokens: int) -> np.ndarray:
    """How often each vocabulary id occurs among the first `tokens` document tokens of the
    stdlib corpus (the tokens the harvest reads, in its order)."""
    from sae_jax.lm.corpus import make_corpus, sequences
    from sae_jax.lm.harvest import DEFAULT_SEQ_LEN

    counts, seen = np.zeros(tokenizer.get_vocab_size(), np.int64), 0
    for seq in sequences(make_corpus(None), tokenizer, DEFAULT_SEQ_LEN):
        ids = seq.input_ids[seq.positions >= 0][:tokens - seen]
        np.add.at(counts, ids, 1)
        seen += len(ids)
        if seen >= tokens:
            break
    return counts


def principal_set(E: np.ndarray, counts: np.ndarray, size: int, exclude: list[int],
                  pool: int = POOL) -> list[int]:
    """The `size` tokens of the `pool` commonest (not in `exclude`) that lie furthest along
    the embeddings' first principal direction, weighted by corpus frequency: a direction the
    base model really uses, shared by many tokens that are common in the data."""
    common = np.argsort(-counts, kind="stable")[:pool]
    common = common[counts[common] > 0]  # tokens that occur
    w = counts[common].astype(np.float64)
    X = np.asarray(E[common], np.float64)
    X = (X - (w[:, None] * X).sum(0) / w.sum()) * np.sqrt(w / w.sum())[:, None]
    pc = np.linalg.svd(X, full_matrices=False)[2][0]
    pc = pc if np.sum((X @ pc) ** 3) >= 0 else -pc  # the sign whose tail is the long one
    order = [int(i) for i in common[np.argsort(-(np.asarray(E[common], np.float64) @ pc),
                                               kind="stable")] if i not in set(exclude)]
    return sorted(order[:size])


def choose_sets(counts: np.ndarray, n_sets: int, size: int, exclude: list[int],
                seed: int = 0, pool: int = POOL) -> list[list[int]]:
    """`n_sets` disjoint random sets of `size` tokens from the `pool` commonest ones that occur
    (and are not in `exclude`): sets with nothing in common but the direction planted on
    them, so only a latent of their own can carry it (latents of single tokens would have to
    absorb it hundreds of times over)."""
    order = [i for i in np.argsort(-counts, kind="stable")
             if counts[i] > 0 and i not in set(exclude)]
    picked = np.random.default_rng(seed).permutation(order[:pool])[:n_sets * size]
    return [sorted(int(i) for i in picked[j * size:(j + 1) * size]) for j in range(n_sets)]


def plant_changes(tensors: dict, added: list[list[int]], removed: list[list[int]],
                  strength: float = STRENGTH, seed: int = 0) -> tuple[dict, list[dict]]:
    """A copy of `tensors` (a BERT state dict of numpy arrays) with the module docstring's
    planted changes in the word embeddings; returns it and one record per change (`kind`,
    `expected` class, `token_ids`, the embedding-space `direction` changed)."""
    E = np.asarray(tensors[WORD_EMBEDDINGS], np.float64)
    new = E.copy()
    rng = np.random.default_rng(seed)
    dirs, _ = np.linalg.qr(rng.normal(size=(E.shape[1], max(len(added), 1))))
    plan = []
    for j, ids in enumerate(added):
        u = dirs[:, j]
        new[ids] += strength * np.linalg.norm(E[ids], axis=1).mean() * u
        plan.append({"kind": "added", "expected": "B-only", "token_ids": list(ids),
                     "direction": u})
    for ids in removed:
        m = E[ids].mean(0) - E.mean(0)
        m /= np.linalg.norm(m)
        new[ids] -= np.outer(new[ids] @ m, m)
        plan.append({"kind": "removed", "expected": "A-only", "token_ids": list(ids),
                     "direction": m})
    out = dict(tensors)
    out[WORD_EMBEDDINGS] = new.astype(tensors[WORD_EMBEDDINGS].dtype)
    return out, plan




def design(tokenizer, base: dict, tokens: int, strength: float | None):
    """This design's (tuned tensors, plan, rows_of): `rows_of(store token ids)` gives each
    change's boolean row mask (the rows of its tokens)."""
    specials = [tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")]
    counts = corpus_counts(tokenizer, tokens)
    removed = [principal_set(base[WORD_EMBEDDINGS], counts, SET_SIZE, specials)]
    added = choose_sets(counts, N_ADDED, SET_SIZE, removed[0] + specials)
    tuned, plan = plant_changes(base, added, removed, STRENGTH if strength is None else strength)
    return tuned, plan, lambda ids: [np.isin(ids, p["token_ids"]) for p in plan]
