"""Faithfulness per feature: is a feature what the model computes, or only a plausible label?

Two complementary scores, each computed the same way for the trained SAE and for a
**random control** (`baselines.random_weights_sae`: every encoder column and decoder row
replaced by an independent random direction of the same norm, biases kept), so a report can
show real against random distributions.

**Causal** (on held-out contexts, through the model's own downstream computation; the SAE's
error term is always kept, so only the feature changes). Let e(h) be the model output (for
MiniLM the sentence embedding) as a function of the residual stream h at the hooked layer,
f_i(h_p) the feature's activation at position p and d_i = W_dec[i] / input_scale its
direction in raw units.

* *Ablation.* For each of C contexts (a window and a position p where feature i fires, taken
  at evenly spaced ranks of its activations so they span weak to strong), the **actual
  effect** of ablating it, Δa = e(h − f_i·d_i at p) − e(h), and the **predicted effect**
  activation × direct attribution, Δp = J_p(−f_i·d_i) with J_p = ∂e/∂h_p (a JVP).
  `ablation_r` = Pearson correlation over the C contexts between a_c = ⟨Δa_c, Δp_c⟩ / ‖Δp_c‖
  (the actual effect measured along the predicted one: signed, so an effect opposite to the
  prediction counts against it) and p_c = ‖Δp_c‖. Why this pair: the claim under test is
  that *how much* the output moves tracks activation × attribution across contexts; a
  cosine of effect vectors would ignore the size, a norm of the actual effect would ignore
  its direction. 1: the linear attribution is a faithful account of the intervention. Also
  `ablation_cos` (mean cos(Δa_c, Δp_c)) and `ablation_effect` (mean ‖Δa_c‖).
* *Steering.* Clamp the feature to `steer_times` × its max activation (in the explanation
  rows) at every spliced position of S neutral held-out windows: h' = h + (v − f_i(h_p))·d_i
  (`intervene.add_direction`), and push R random directions of the same norm with the same
  per-position amounts. The feature's **concept** c_i is the mean output of its top
  contexts (MiniLM: the unit mean sentence embedding of the texts of its catalog top
  examples). Gain g = mean over the S windows of cos(e(h'), c_i) − cos(e(h), c_i).
  `steer_gain` = g of the feature's own direction; `steer_z` = (g − mean g_random) /
  std g_random (sample std over the R random directions); `steer_winrate` = the fraction of
  random directions it beats (ties count ½). **`causal` = `steer_z`**: how many random-push
  standard deviations the feature's own direction moves the output further toward what it
  detects. For the random control the decoder row is unrelated to what its encoder detects,
  so its `steer_z` is the null distribution (≈ N(0, 1)).

**Explanatory** (model-free, no LLM). The explanation of feature i is its catalog's top
tokens T_i computed on *training* rows, each with its firing rate
ρ_i(t) = #(fires on t) / #(occurrences of t) there. On *held-out* tokens, the binary
prediction "fires iff the token is in T_i" gives `precision`, `recall` and `f1` against
where it actually fires (f_i > 0; precision is None if it predicts no token, F1 then 0);
the graded prediction ρ_i(token) (0 outside T_i) gives **`explanatory` = Pearson
correlation** with the actual activation over all held-out tokens (a simulation score whose
simulator is a token lookup table). 1: the token list predicts where and how strongly it
fires; 0: it says nothing (also when it predicts no held-out token at all); None when the
feature never fires on held-out tokens.

Separation from random: `auc` = P(score of a random trained feature > score of a random
control feature) (Mann-Whitney, ties ½); 0.5 = indistinguishable, 1 = fully separated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.analysis.intervene import add_direction, random_directions
from sae_jax.batches import padded_batches
from sae_jax.errors import UserError
from sae_jax.lm.hooks import OutputFn
from sae_jax.vectors import unit_vectors

MIN_CONTEXTS = 3  # a correlation over fewer contexts says nothing


# ----------------------------------------------------------------------------------------
# The SAEs scored


def feature_columns(sae, x: np.ndarray, columns: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Activations `(N, len(columns))` of the SAE's features `columns` on raw rows `x (N, d)`
    (the whole encoder runs, so TopK competition is respected)."""
    out = [np.asarray(sae.encode(b.arrays[0], columns))[:b.n_valid]
           for b in padded_batches(len(x), batch, x)]
    return np.concatenate(out) if out else np.zeros((0, len(columns)), np.float32)


def firing_counts(sae, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """How many of the raw rows `x (N, d)` each feature fires on, `(F,)` int64."""
    counts = np.zeros(sae.width, np.int64)
    for b in padded_batches(len(x), batch, x):
        counts += np.asarray(_count(sae, b.arrays[0], b.n_valid))
    return counts


@jax.jit
def _count(sae, x, n_valid):
    fired = (sae.encode_raw(x) > 0) & (jnp.arange(x.shape[0]) < n_valid)[:, None]
    return jnp.sum(fired, axis=0)


# ----------------------------------------------------------------------------------------
# Batched interventions: one compiled shape per output_fn


@functools.lru_cache(maxsize=8)
def _ablation_fn(output_fn: OutputFn):
    def run(model_params, h, mask, splice, pos, direction, amount):
        at = (jnp.arange(h.shape[1])[None, :] == pos[:, None]) & splice
        delta = add_direction(jnp.zeros_like(h), direction[:, None, :], amount[:, None], at)
        def out(x):
            return output_fn(model_params, x, mask)

        clean, predicted = jax.jvp(out, (h,), (delta,))
        return out(h + delta) - clean, predicted

    return jax.jit(run)


@functools.lru_cache(maxsize=8)
def _steer_fn(output_fn: OutputFn):
    def run(model_params, h, mask, splice, amounts, direction):
        return output_fn(model_params, add_direction(h, direction[:, None, :], amounts, splice),
                         mask)

    return jax.jit(run)


def _run_batched(fn, model_params, windows: tuple, win: np.ndarray, items: tuple,
                 batch: int) -> list:
    """Calls `fn(model_params, *(a[win_b] for a in windows), *items_b)` over fixed-shape
    batches of items (fill items point at window 0 with zero amounts; the windows of a batch
    are gathered only then) and concatenates each output over the items."""
    outs = []
    for b in padded_batches(len(win), batch, win, *items):
        w, *its = b.arrays
        res = fn(model_params, *[a[w] for a in windows], *its)
        res = res if isinstance(res, tuple) else (res,)
        outs.append([np.asarray(r, np.float64)[:b.n_valid] for r in res])
    return [np.concatenate(parts) for parts in zip(*outs)]


@dataclass(frozen=True)
class Windows:
    """Held-out contexts the causal scores run on.

    Attributes:
      h: `(n, T, d)` float32 residual stream at the hooked layer.
      mask: `(n, T)` int attention mask.
      splice: `(n, T)` bool, the positions the SAE reads and writes.
      clean: `(n, m)` float64 model output, `output_fn(h)`.
    """

    h: np.ndarray
    mask: np.ndarray
    splice: np.ndarray
    clean: np.ndarray


def clean_outputs(output_fn: OutputFn, model_params, h, mask, batch: int = 64) -> np.ndarray:
    """`output_fn` on unmodified windows (the reference every effect is measured from)."""
    n = len(h)
    zero = np.zeros((n, h.shape[-1]), np.float32)
    none = np.zeros(h.shape[:2], np.float32)
    return _run_batched(_steer_fn(output_fn), model_params, (h, mask, none.astype(bool)),
                        np.arange(n), (none, zero), batch)[0]


# ----------------------------------------------------------------------------------------
# Scores


def pearson(a, b) -> float | None:
    """Pearson correlation; None if `b` is constant (undefined), 0.0 if only `a` is."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(b) < 2 or np.ptp(b) == 0:
        return None
    if np.ptp(a) == 0:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    return float(np.clip((a @ b) / np.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


def ablation_score(actual: np.ndarray, predicted: np.ndarray) -> dict:
    """`ablation_r`, `ablation_cos`, `ablation_effect` (module docstring) from the actual and
    predicted effect vectors `(C, m)` of one feature's contexts."""
    p_norm = np.linalg.norm(predicted, axis=1)
    a_norm = np.linalg.norm(actual, axis=1)
    along = np.einsum("cm,cm->c", actual, predicted) / np.maximum(p_norm, 1e-30)
    cos = along / np.maximum(a_norm, 1e-30)
    return {"ablation_r": pearson(along, p_norm) if len(actual) >= MIN_CONTEXTS else None,
            "ablation_cos": float(cos.mean()) if len(cos) else None,
            "ablation_effect": float(a_norm.mean()) if len(a_norm) else None}


def steering_score(gains: np.ndarray) -> dict:
    """`steer_gain`, `steer_z`, `steer_winrate` from gains `(1 + R,)`: the feature's own
    direction first, then the R random directions."""
    g, rand = float(gains[0]), np.asarray(gains[1:], np.float64)
    std = float(rand.std(ddof=1)) if len(rand) > 1 else 0.0
    return {"steer_gain": g,
            "steer_z": (g - float(rand.mean())) / std if std > 0 else None,
            "steer_winrate": float(np.mean((rand < g) + 0.5 * (rand == g))) if len(rand)
            else None}


def explanation(top_tokens: list[tuple[int, int]], token_totals: np.ndarray) -> dict:
    """The explanation of one feature: its top tokens `[(token id, firing count)]` on the
    training rows and each token's firing rate there (`token_totals`: occurrences per id)."""
    ids = np.array([t for t, _ in top_tokens], np.int64)
    fires = np.array([c for _, c in top_tokens], np.float64)
    totals = token_totals[ids] if len(ids) else np.zeros(0)
    return {"tokens": ids, "rates": fires / np.maximum(np.maximum(totals, fires), 1)}


def explanatory_score(acts: np.ndarray, tokens: np.ndarray, expl: dict) -> dict:
    """`precision`, `recall`, `f1` and `explanatory` (module docstring) of one feature's
    explanation against its actual activations `acts (N,)` on held-out `tokens (N,)`."""
    rate = np.zeros(len(tokens))
    if len(expl["tokens"]):
        order = np.argsort(expl["tokens"])
        keys = expl["tokens"][order]
        at = np.clip(np.searchsorted(keys, tokens), 0, len(keys) - 1)
        hit = keys[at] == tokens
        rate[hit] = expl["rates"][order][at[hit]]
    predicted, fired = rate > 0, acts > 0
    tp = int(np.sum(predicted & fired))
    precision = tp / int(predicted.sum()) if predicted.any() else None
    recall = tp / int(fired.sum()) if fired.any() else None
    f1 = (None if recall is None else 2 * precision * recall / (precision + recall)
          if precision and recall else 0.0)
    return {"precision": precision, "recall": recall, "f1": f1,
            "explanatory": pearson(rate, acts)}


def auc(real, control) -> float | None:
    """P(real > control) + ½ P(tie) over all pairs (Mann-Whitney U / (n·m)), Nones dropped."""
    a = np.array([v for v in real if v is not None], np.float64)
    b = np.array([v for v in control if v is not None], np.float64)
    if not len(a) or not len(b):
        return None
    both = np.concatenate([a, b])
    order = np.argsort(both, kind="stable")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    for v in np.unique(both):  # average ranks over ties
        tie = both == v
        ranks[tie] = ranks[tie].mean()
    u = ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


# ----------------------------------------------------------------------------------------
# The causal pipeline over many features at once


def choose_contexts(acts: np.ndarray, splice: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """`(window, position)` of up to `n` firing positions of one feature, at evenly spaced
    ranks of its activation `acts (windows, T)` (weak to strong; deterministic)."""
    w, p = np.nonzero((acts > 0) & splice)
    if len(w) == 0:
        return w, p
    order = np.lexsort((p, w, acts[w, p]))
    pick = np.unique(np.round(np.linspace(0, len(order) - 1, min(n, len(order)))).astype(int))
    return w[order[pick]], p[order[pick]]


def causal_scores(output_fn: OutputFn, model_params, windows: Windows, acts: np.ndarray,
                  directions: np.ndarray, concepts: np.ndarray, steer_values: np.ndarray,
                  neutral: np.ndarray, *, n_contexts: int = 8, n_random: int = 8,
                  seed: int = 0, feature_ids=None, batch: int = 64) -> list[dict]:
    """Ablation and steering scores (module docstring) for many features in batched passes.

    Args:
      output_fn, model_params: the model downstream of the hooked layer.
      windows: the held-out contexts, with their clean outputs.
      acts: `(F, n, T)` activations of the F features on the windows.
      directions: `(F, d)` each feature's decoder row in raw units (W_dec[i] / input_scale).
      concepts: `(F, m)` each feature's concept output (see module docstring).
      steer_values: `(F,)` the clamp value v of each feature.
      neutral: indices of the S windows steering runs on.
      n_contexts: ablation contexts per feature (C).
      n_random: random same-norm directions per feature (R).
      seed, feature_ids: the random directions of feature j are seeded by
        (seed, feature_ids[j]), so a feature gets the same control in any selection.
      batch: windows per model call.

    Returns:
      One dict per feature: `n_contexts` and the ablation and steering scores.
    """
    n_feat = len(directions)
    if acts.shape[0] != n_feat or len(concepts) != n_feat or len(steer_values) != n_feat:
        raise UserError("acts, directions, concepts and steer_values must list the same "
                        "features")
    ids = np.arange(n_feat) if feature_ids is None else np.asarray(feature_ids)
    # Ablation: one (window, position, direction, amount) item per context.
    owner, win, pos, amount = [], [], [], []
    for j in range(n_feat):
        w, p = choose_contexts(acts[j], windows.splice, n_contexts)
        owner += [j] * len(w)
        win.append(w)
        pos.append(p)
        amount.append(-acts[j][w, p])
    owner = np.asarray(owner, np.int64)
    results = [{"n_contexts": int(np.sum(owner == j))} for j in range(n_feat)]
    if len(owner):
        win, pos = np.concatenate(win), np.concatenate(pos).astype(np.int32)
        amount = np.concatenate(amount).astype(np.float32)
        actual, predicted = _run_batched(
            _ablation_fn(output_fn), model_params, (windows.h, windows.mask, windows.splice),
            win, (pos, directions[owner].astype(np.float32), amount), batch)
        for j in range(n_feat):
            sel = owner == j
            results[j].update(ablation_score(actual[sel], predicted[sel]))
    # Steering: (feature, direction, neutral window) items; amounts v - f_i(h) at each token.
    neutral = np.asarray(neutral, np.int64)
    s = len(neutral)
    dirs = np.stack([np.concatenate([directions[j][None], random_directions(
        directions[j], n_random, _seed(seed, ids[j]))]) for j in range(n_feat)])  # (F,1+R,d)
    f_idx, r_idx, w_idx = (a.ravel() for a in np.meshgrid(
        np.arange(n_feat), np.arange(n_random + 1), np.arange(s), indexing="ij"))
    amounts = (steer_values[f_idx, None] - acts[f_idx, neutral[w_idx]]).astype(np.float32)
    outs = _run_batched(_steer_fn(output_fn), model_params,
                        (windows.h, windows.mask, windows.splice), neutral[w_idx],
                        (amounts, dirs[f_idx, r_idx].astype(np.float32)), batch)[0]
    u = unit_vectors(concepts - windows.clean.mean(0))[f_idx]
    gain = np.einsum("im,im->i", outs - windows.clean[neutral[w_idx]], u)
    gain = gain.reshape(n_feat, n_random + 1, s).mean(-1)
    for j in range(n_feat):
        results[j].update(steering_score(gain[j]))
        results[j]["causal"] = results[j]["steer_z"]
    return results


def _seed(seed: int, feature: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(feature)]).generate_state(1)[0])
