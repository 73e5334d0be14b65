"""The MLP design of `diff_minilm.py --plant mlp`: changes planted where the harvest reads, as a
fine-tune would, in the MLP of the block whose output `harvest --layer 3` stores (MiniLM's
third block: `params["layers"][2]`, Hugging Face `encoder.layer.2`).

- *added* (expected B-only): each of the `n_added` least-used intermediate neurons (lowest mean
  GELU output over the corpus sample) is repurposed: its input weights become the unit mean
  MLP input of a token set T (minus the mean over all rows), its bias a threshold so that it
  fires on the `FIRE_SHARE` of rows furthest along that direction (mostly rows of T), with a
  slope that puts its median firing pre-activation at `SLOPE_PRE`, and its output weights a
  fresh seeded random direction (orthogonal to the all-ones vector, which the block's
  LayerNorm removes, and to the other new directions) scaled so that its median write has
  `strength` x the mean norm of the MLP input. Its old output (a near-constant -0.13 x its
  column: such neurons sit in GELU's negative dip) is thereby removed too.
  T: the `SET_SIZE` tokens whose mean MLP inputs are closest (cosine, centred) to that of a
  seeded random one of the 300 commonest tokens: a coherent group a neuron can detect.
- *removed* (expected A-only): the output weights of an existing neuron that is strongly and
  selectively active are zeroed: of the neurons that fire (>= half their 99.9th percentile)
  on 0.5-5 % of rows, on >= `MIN_TOKENS` different tokens among those of their 200 strongest,
  the one with the largest write (99.9th percentile x output norm). The base has its
  direction, the tuned model not.

*Rows of a change*: the rows where its neuron's output (in the model that has it: tuned for
added, base for removed) is at least a quarter of its largest over the store's rows.
"""

from __future__ import annotations

import numpy as np

LAYER = 3
BLOCK = LAYER - 1  # Hugging Face's 0-based block index of the stream after layer 3
N_ADDED, SET_SIZE, COMMONEST = 2, 16, 300
FIRE_SHARE, SLOPE_PRE = 0.04, 3.0
STRENGTH = 0.5
MIN_TOKENS, ROW_FRACTION = 15, 0.25


def names(block: int = BLOCK) -> tuple[str, str, str]:
    """The state-dict names of the block's MLP input weight, input bias and output weight."""
    p = f"encoder.layer.{block}"
    return f"{p}.intermediate.dense.weight", f"{p}.intermediate.dense.bias", \
        f"{p}.output.dense.weight"


def mlp_inputs(params: dict, tokenizer, tokens: int, layer: int = LAYER,
               batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Block `layer`'s MLP input (n, d) and token ids (n,) for the first `tokens` document
    tokens of the stdlib corpus, in the order (and sequences) `harvest` stores them."""
    import jax

    from sae_jax.lm import minilm
    from sae_jax.lm.corpus import make_corpus, sequences
    from sae_jax.lm.harvest import DEFAULT_SEQ_LEN

    fn = jax.jit(lambda i, m: minilm.sublayer_io(params, i, m, layer, "mlp")[0])
    xs, ids, seen, seqs = [], [], 0, []

    def flush():
        if seqs:
            x = np.asarray(fn(np.stack([s.input_ids for s in seqs]),
                              np.stack([s.attention_mask for s in seqs])))
            keep = np.stack([s.positions >= 0 for s in seqs])
            xs.append(x[keep])
            ids.append(np.stack([s.input_ids for s in seqs])[keep])
            seqs.clear()

    for seq in sequences(make_corpus(None), tokenizer, DEFAULT_SEQ_LEN):
        seqs.append(seq)
        seen += int((seq.positions >= 0).sum())
        if len(seqs) == batch:
            flush()
        if seen >= tokens:
            break
    flush()
    return np.concatenate(xs)[:tokens], np.concatenate(ids)[:tokens]


def activations(tensors: dict, x: np.ndarray, neurons, block: int = BLOCK) -> np.ndarray:
    """The GELU outputs (n, len(neurons)) of the block's intermediate `neurons` on inputs x."""
    from scipy.special import erf

    w_in, b_in, _ = names(block)
    pre = x.astype(np.float64) @ tensors[w_in][neurons].T.astype(np.float64) \
        + tensors[b_in][neurons]
    return 0.5 * pre * (1 + erf(pre / np.sqrt(2)))


def least_used(tensors: dict, x: np.ndarray, k: int, block: int = BLOCK) -> list[int]:
    """The `k` intermediate neurons of lowest mean output over x: the ones a repurposing
    fine-tune would overwrite at the least cost."""
    n = tensors[names(block)[1]].shape[0]
    mean = np.concatenate([activations(tensors, x, list(range(lo, min(lo + 256, n))), block)
                           .mean(0) for lo in range(0, n, 256)])
    return [int(i) for i in np.argsort(mean, kind="stable")[:k]]


def selective_neuron(tensors: dict, x: np.ndarray, token_ids: np.ndarray, exclude: list[int],
                     block: int = BLOCK) -> int:
    """The module docstring's removed neuron: strongly and selectively active, on many tokens."""
    n = tensors[names(block)[1]].shape[0]
    out_norm = np.linalg.norm(tensors[names(block)[2]], axis=0)
    best, best_write = None, -np.inf
    for lo in range(0, n, 256):
        cols = list(range(lo, min(lo + 256, n)))
        h = activations(tensors, x, cols, block)
        p = np.percentile(h, 99.9, axis=0)
        share = (h >= 0.5 * p).mean(0)
        for j, i in enumerate(cols):
            write = p[j] * out_norm[i]
            if i in exclude or not 0.005 <= share[j] <= 0.05 or write <= best_write:
                continue
            top = np.argsort(-h[:, j], kind="stable")[:200]
            top = top[h[top, j] >= 0.5 * p[j]]
            if len(np.unique(token_ids[top])) >= MIN_TOKENS:
                best, best_write = i, write
    if best is None:
        raise SystemExit("no neuron of block 3 is selective enough to remove")
    return best


def token_sets(x: np.ndarray, token_ids: np.ndarray, n_sets: int, size: int = SET_SIZE,
               exclude: list[int] = (), seed: int = 0, min_count: int = 15) -> list[list[int]]:
    """`n_sets` disjoint groups of `size` tokens with similar mean MLP inputs (centred, by
    cosine), each around a seeded random one of the `COMMONEST` tokens (of those seen at
    least `min_count` times, not in `exclude`)."""
    ids, counts = np.unique(token_ids, return_counts=True)
    ok = (counts >= min_count) & ~np.isin(ids, list(exclude))
    ids, counts = ids[ok], counts[ok]
    mu = x.mean(0)
    means = np.stack([x[token_ids == t].mean(0) - mu for t in ids])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    commonest = ids[np.argsort(-counts, kind="stable")[:COMMONEST]]
    taken, sets = set(), []
    for centre in np.random.default_rng(seed).permutation(commonest):
        if len(sets) == n_sets:
            break
        if int(centre) in taken:
            continue
        near = [int(t) for t in ids[np.argsort(-(means @ means[ids == centre][0]),
                                               kind="stable")] if int(t) not in taken][:size]
        if int(centre) not in near:
            continue
        taken.update(near)
        sets.append(sorted(near))
    return sets


def plant_mlp(tensors: dict, x: np.ndarray, token_ids: np.ndarray, added: list[list[int]],
              neurons: list[int], removed: int, strength: float = STRENGTH, seed: int = 0,
              block: int = BLOCK) -> tuple[dict, list[dict]]:
    """A copy of `tensors` with the module docstring's changes: neuron `neurons[j]` repurposed
    to fire on token set `added[j]` and write a new direction, neuron `removed`'s output
    zeroed. Returns it and one record per change (`kind`, `expected`, `neuron`, `token_ids`
    (the set it was built on; for the removed neuron its tokens among its 200 strongest
    rows), `direction` (unit, in the stream) and, for added ones, `fires_on` (share of the
    sample's rows))."""
    w_in, b_in, w_out = names(block)
    new_w_in, new_b_in, new_w_out = (np.asarray(tensors[k], np.float64).copy()
                                     for k in (w_in, b_in, w_out))
    d = x.shape[1]
    mu = x.mean(0, dtype=np.float64)
    rng = np.random.default_rng(seed)
    basis = np.concatenate([np.ones((d, 1)) / np.sqrt(d), rng.normal(size=(d, len(added)))], 1)
    dirs = np.linalg.qr(basis)[0][:, 1:]  # orthonormal, each orthogonal to the all-ones vector
    dirs *= np.sign(np.sum(dirs * basis[:, 1:], 0))  # QR's sign convention: keep the draws'
    plan, scale = [], float(np.linalg.norm(x, axis=1).mean())
    for j, (ids, n) in enumerate(zip(added, neurons)):
        w = x[np.isin(token_ids, ids)].mean(0) - mu
        w /= np.linalg.norm(w)
        proj = (x - mu) @ w
        thr = np.quantile(proj, 1 - FIRE_SHARE)
        slope = SLOPE_PRE / np.median(proj[proj > thr] - thr)
        new_w_in[n], new_b_in[n] = slope * w, -slope * (thr + mu @ w)
        pre = slope * (proj - thr)
        fired = pre > 0
        gelu = activations({w_in: new_w_in, b_in: new_b_in}, x[fired], [n], block)[:, 0]
        new_w_out[:, n] = dirs[:, j] * strength * scale / np.median(gelu)
        plan.append({"kind": "added", "expected": "B-only", "neuron": int(n),
                     "token_ids": list(ids), "direction": dirs[:, j],
                     "fires_on": float(fired.mean())})
    h = activations(tensors, x, [removed], block)[:, 0]
    top = np.argsort(-h, kind="stable")[:200]
    direction = new_w_out[:, removed] / np.linalg.norm(new_w_out[:, removed])
    new_w_out[:, removed] = 0.0
    plan.append({"kind": "removed", "expected": "A-only", "neuron": int(removed),
                 "token_ids": sorted(int(t) for t in np.unique(token_ids[top])),
                 "direction": direction})
    out = dict(tensors)
    for k, v in ((w_in, new_w_in), (b_in, new_b_in), (w_out, new_w_out)):
        out[k] = v.astype(tensors[k].dtype)
    return out, plan


def change_rows(base: dict, tuned: dict, x: np.ndarray, plan: list[dict],
                block: int = BLOCK) -> list[np.ndarray]:
    """Per change, the boolean mask of the rows of x where its neuron's output (in the model
    that has it) is at least `ROW_FRACTION` of its largest."""
    out = []
    for p in plan:
        h = activations(tuned if p["kind"] == "added" else base, x, [p["neuron"]], block)[:, 0]
        out.append(h >= ROW_FRACTION * h.max())
    return out


def design(tokenizer, base: dict, tokens: int, strength: float | None):
    """This design's (tuned tensors, plan, rows_of): `rows_of(store token ids)` gives each
    change's boolean row mask (module docstring); the store must hold the tokens read here."""
    from sae_jax.lm import minilm

    x, ids = mlp_inputs(minilm.load_params(), tokenizer, tokens)
    specials = [tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")]
    neurons = least_used(base, x, N_ADDED)
    removed = selective_neuron(base, x, ids, exclude=neurons)
    added = token_sets(x, ids, N_ADDED, exclude=specials)
    tuned, plan = plant_mlp(base, x, ids, added, neurons, removed,
                            STRENGTH if strength is None else strength)

    def rows_of(store_ids):
        if not np.array_equal(store_ids, ids):
            raise SystemExit("the store's tokens are not the MLP-input pass's tokens")
        return change_rows(base, tuned, x, plan)

    return tuned, plan, rows_of
