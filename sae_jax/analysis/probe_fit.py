"""The linear probe both probing and absorption fit, and the latent statistics they select by.

**The probe** is scikit-learn's default `LogisticRegression` (SAEBench's choice), written out
so that nothing but numpy is needed: minimise

    ½‖w‖² + C Σᵢ sᵢ log(1 + exp(−ỹᵢ (xᵢ·w + b)))      (ỹᵢ = ±1, intercept b not penalised)

with C = 1 and per-row weights sᵢ (1, or `balanced`: each class weighing half, as
`class_weight="balanced"`). Features are not standardised (as in SAEBench), so the probe's
`w` is a direction in the activation space, which absorption needs. The objective is strictly
convex; Newton's method (steps by preconditioned conjugate gradients, `_solve_spd`) with a
backtracking line search reaches the optimum in a few dozen
steps for the k ≤ 20 latents of a sparse probe and the few hundred dimensions of a residual
stream; beyond `NEWTON_MAX_DIM` dimensions (a large LM's residual) L-BFGS (scipy) takes over,
as a d×d Hessian would cost more than it saves.

**Latent selection** (SAEBench's sparse probing): the k latents whose mean activation differs
most between the two classes on the training rows; absorption takes the largest signed
difference (latents that fire *for* the class). `class_means` streams the SAE over the rows
in batches, so no (rows × width) matrix is ever held.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

C = 1.0
NEWTON_MAX_DIM = 1024
MAX_NEWTON_STEPS = 100
MAX_LBFGS_STEPS = 1000
GRAD_TOL = 1e-9  # Newton stops at |gradient| < GRAD_TOL · Σ row weights
LBFGS_GTOL = 1e-6
ENCODE_BATCH = 2048
GRAM_ROWS = 512


@dataclass(frozen=True)
class Probe:
    """A fitted logistic probe: `score(x) = x @ w + b`, positive = the class."""

    w: np.ndarray
    b: float

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.w + self.b

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.score(x) > 0


def logistic_objective(theta, xa, y, s, c):
    """Value, gradient and per-row Hessian weights of the objective at `theta = [w, b]`."""
    z = xa @ theta
    sign = 2.0 * y - 1.0
    loss = c * np.sum(s * np.logaddexp(0.0, -sign * z))
    w = theta[:-1]
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid, overflow-free
    grad = c * (xa.T @ (s * (p - y)))
    grad[:-1] += w
    return 0.5 * float(w @ w) + loss, grad, c * s * p * (1.0 - p)


@functools.cache
def _gram_fn():
    import jax

    return jax.jit(lambda x, h: (x.T * h) @ x)


def _weighted_gram(x32: np.ndarray, h: np.ndarray) -> np.ndarray:
    """`xᵀ diag(h) x` in float32, returned as float64: the Newton Hessian's cost. Computed by
    XLA (measured 6-10x faster than numpy's threaded BLAS on a loaded 2-core box), rows
    zero-padded to a multiple of `GRAM_ROWS` so that a handful of shapes compile."""
    n = len(x32)
    pad = -n % GRAM_ROWS
    if pad:
        x32 = np.concatenate([x32, np.zeros((pad, x32.shape[1]), np.float32)])
        h = np.concatenate([h, np.zeros(pad)])
    return np.asarray(_gram_fn()(x32, h.astype(np.float32)), np.float64)


def _solve_spd(a: np.ndarray, b: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """`a⁻¹ b` for a symmetric positive definite `a`, by conjugate gradients preconditioned
    with `a`'s diagonal. Why not `np.linalg.solve`: LAPACK's multithreaded solve slows down
    ~50x when the cores are shared (measured: 0.4 s for 385 x 385 on a loaded 2-core box),
    while the d x d matrix-vector products CG needs take microseconds."""
    inv_diag = 1.0 / np.maximum(np.diag(a), 1e-300)
    x = np.zeros_like(b)
    r = b.copy()
    z = inv_diag * r
    p = z.copy()
    rz = float(r @ z)
    stop = rtol * float(b @ b)
    for _ in range(4 * len(b)):
        if float(r @ r) <= stop:
            break
        ap = a @ p
        alpha = rz / float(p @ ap)
        x += alpha * p
        r -= alpha * ap
        z = inv_diag * r
        rz, rz_old = float(r @ z), rz
        p = z + (rz / rz_old) * p
    return x


def _newton(xa, y, s, c) -> np.ndarray:
    """Newton's method; the Hessian is summed in float32 (`_weighted_gram`, the dominant cost
    for a residual stream's width) while value and gradient stay float64, so the optimum is
    exact."""
    theta = np.zeros(xa.shape[1])
    xa32 = xa.astype(np.float32)
    penalty = np.ones(xa.shape[1])
    penalty[-1] = 1e-10  # keeps the Hessian invertible when every row is far from the boundary
    value, grad, h = logistic_objective(theta, xa, y, s, c)
    for _ in range(MAX_NEWTON_STEPS):
        if np.max(np.abs(grad)) < GRAD_TOL * max(1.0, c * s.sum()):
            break
        hess = _weighted_gram(xa32, h) + np.diag(penalty)
        step = _solve_spd(hess, grad)
        t = 1.0
        while True:
            new = theta - t * step
            new_value, new_grad, new_h = logistic_objective(new, xa, y, s, c)
            if new_value <= value - 1e-4 * t * float(grad @ step) or t < 1e-10:
                break
            t *= 0.5
        if value - new_value < 1e-12 * max(1.0, abs(value)):
            theta = new
            break
        theta, value, grad, h = new, new_value, new_grad, new_h
    return theta


def _lbfgs(xa, y, s, c) -> np.ndarray:
    from scipy.optimize import minimize

    found = minimize(lambda t: logistic_objective(t, xa, y, s, c)[:2], np.zeros(xa.shape[1]),
                     jac=True, method="L-BFGS-B",
                     options={"maxiter": MAX_LBFGS_STEPS, "gtol": LBFGS_GTOL})
    return found.x


def fit_logistic(x: np.ndarray, y: np.ndarray, balanced: bool = False, c: float = C,
                 newton_max_dim: int = NEWTON_MAX_DIM) -> Probe:
    """The L2 logistic probe of boolean labels `y` on features `x (n, d)` (module docstring).

    Args:
      balanced: weigh each class half (scikit-learn's `class_weight="balanced"`).
      newton_max_dim: the widest `x` fitted by Newton's method; wider ones use L-BFGS.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, bool).astype(np.float64)
    s = np.ones(len(y))
    if balanced:
        n_pos = y.sum()
        if 0 < n_pos < len(y):
            s = np.where(y > 0, len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos)))
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    theta = (_newton if xa.shape[1] <= newton_max_dim + 1 else _lbfgs)(xa, y, s, c)
    return Probe(theta[:-1], float(theta[-1]))


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred, bool) == np.asarray(y, bool)))


def f1_score(pred: np.ndarray, y: np.ndarray) -> float:
    """F1 of boolean predictions (0 when there are no true positives)."""
    pred, y = np.asarray(pred, bool), np.asarray(y, bool)
    tp = float(np.sum(pred & y))
    return 0.0 if tp == 0 else 2 * tp / (float(pred.sum()) + float(y.sum()))


def top_latents(mean_pos: np.ndarray, mean_neg: np.ndarray, k: int,
                signed: bool = False) -> np.ndarray:
    """The `k` latents with the largest |mean difference| between the classes (or the largest
    positive difference, `signed`), best first; ties go to the lower index."""
    diff = np.asarray(mean_pos, np.float64) - np.asarray(mean_neg, np.float64)
    order = np.argsort(-(diff if signed else np.abs(diff)), kind="stable")
    return order[:k]


def latent_batches(encode, x: np.ndarray, batch: int = ENCODE_BATCH):
    """`encode(rows) -> (b, F)` of `x` in batches of exactly `batch` rows (the last padded
    with zero rows, its fill cut off again), so a jitted encoder compiles once; yields
    `(start, float32 latents)`."""
    for i in range(0, len(x), batch):
        part = x[i:i + batch]
        n = len(part)
        if n < batch and len(x) > batch:
            part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), part.dtype)])
        yield i, np.asarray(encode(part), np.float32)[:n]


def class_means(encode, x: np.ndarray, groups: np.ndarray,
                batch: int = ENCODE_BATCH) -> np.ndarray:
    """Mean latent activation of each row group: `(G, F)` for `groups (n, G)` boolean
    memberships (a row may be in several groups), `encode(x batch) -> (b, F)` streamed over
    `x` in batches. A group without rows has mean 0."""
    groups = np.asarray(groups, np.float32)
    total = 0.0
    for i, f in latent_batches(encode, x, batch):
        total = total + (groups[i:i + len(f)].T @ f).astype(np.float64)
    return total / np.maximum(groups.sum(0)[:, None], 1)


def latent_columns(encode, x: np.ndarray, columns: np.ndarray,
                   batch: int = ENCODE_BATCH) -> np.ndarray:
    """`encode(x)[:, columns]` as float32 `(n, len(columns))`, streamed in batches."""
    columns = np.asarray(columns, np.int64)
    out = np.zeros((len(x), len(columns)), np.float32)
    for i, f in latent_batches(encode, x, batch):
        out[i:i + len(f)] = f[:, columns]
    return out


def balanced_indices(positive: np.ndarray, negative: np.ndarray, limit: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Equal numbers of `positive` and `negative` row indices (as many as the smaller class
    has, at most `limit` each), sampled with `rng`, in sorted order."""
    n = min(len(positive), len(negative), limit)
    return np.sort(np.concatenate([rng.choice(positive, n, replace=False),
                                   rng.choice(negative, n, replace=False)]))
