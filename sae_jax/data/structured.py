"""Synthetic activations with the structure that makes real SAEs fail, and the truth to score.

`synthetic.sparse_dictionary_data` draws every atom independently with one frequency: an SAE
that recovers it says little about language-model activations. Here, in the spirit of
SynthSAEBench (Chanin et al., arXiv 2602.14687), the N true features have:

* **a heavy-tailed frequency spread**: top-level feature i fires with probability
  p_i = min(p_max, c · r_i^(-zipf_exponent)), r_i its (random) rank 1..n_top, c chosen so
  that the expected number of active features per row (true L0, children included) is
  `active`;
* **hierarchy** (the cause of *absorption*): `n_parents` parents with `n_children` children
  each. A child fires only in a row where its parent fires: there, with probability
  `child_prob`, exactly one child (uniformly chosen; siblings are mutually exclusive) fires.
  An SAE can then fold the parent's direction into each child's latent and leave the parent
  latent silent whenever a child is on;
* **correlated firing**: `n_groups` groups of `group_size` top-level non-parent features fire
  through a Gaussian copula: member i fires when √ρ·z_g + √(1−ρ)·e_i < Φ⁻¹(p_i), z_g shared
  by the group, so marginals stay p_i while members co-fire far more often than chance;
* **superposition**: N unit-norm atoms in d < N dimensions, random Gaussian directions,
  optionally spread apart by `orthogonalize_steps` of gradient descent on Σ_{i≠j} (a_i·a_j)²
  (they can never be orthogonal: `mean_max_overlap` reports how far they are).

Magnitudes are Exp(1) + 0.5 (as in `synthetic`), so a feature is clearly on or off. A row is
x = Σ_i c_i a_i + bias (+ optional Gaussian noise). Feature ids: parents first
(0..n_parents−1), then their children (parent p owns n_parents + p·n_children + j), then the
other top-level features, of which the first n_groups·group_size form the groups in order.

Rows are a pure function of (structure seed, stream, row index): `sample` draws chunks of
`CHUNK_ROWS` rows from their own generator (`_rng(seed, stream, chunk)`), so the training
rows (stream 1) and held-out rows (stream 2) are independent and any range can be
regenerated. (Generators are keyed by `SeedSequence(seed, spawn_key=...)`, not by
`default_rng([seed, key])`: numpy pads a short entropy list with zeros, so `[0, 0]` would
give the very stream of `default_rng(0)`.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy.special import ndtri

from sae_jax.errors import UserError
from sae_jax.vectors import unit_vectors

CHUNK_ROWS = 8192
TRAIN_STREAM, HELDOUT_STREAM = 1, 2


@dataclasses.dataclass(frozen=True)
class StructuredSpec:
    """The parameters of a structured synthetic dataset (module docstring)."""

    d_in: int = 64
    """Dimension of a row."""
    n_atoms: int = 256
    """Number of true features N (parents, children and independent/correlated ones)."""
    active: float = 5.0
    """Expected true L0: active features per row, children included."""
    zipf_exponent: float = 0.7
    """Top-level frequencies fall as rank^(-zipf_exponent): 0 is uniform, 1 is Zipf's law."""
    p_max: float = 0.5
    """Cap on any one feature's firing probability."""
    n_parents: int = 16
    """Parent features, each with `n_children` children."""
    n_children: int = 4
    """Children per parent (mutually exclusive)."""
    child_prob: float = 0.6
    """Probability that one child fires in a row where its parent fires."""
    n_groups: int = 16
    """Groups of correlated top-level (non-parent) features."""
    group_size: int = 4
    """Features per correlated group."""
    rho: float = 0.7
    """Copula correlation of the latent Gaussians within a group (0: independent)."""
    orthogonalize_steps: int = 0
    """Gradient steps spreading the atoms apart (0: plain random directions)."""
    offset: float = 1.0
    """Norm scale of the constant bias added to every row (a pre-encoder bias to learn)."""
    noise: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every row."""

    def __post_init__(self):
        n_tree = self.n_parents * (1 + self.n_children)
        n_top = self.n_atoms - self.n_parents * self.n_children
        checks = [
            (self.d_in > 0 and self.n_atoms > 0, "d_in and n_atoms must be > 0"),
            (min(self.n_parents, self.n_children, self.n_groups, self.group_size,
                 self.orthogonalize_steps) >= 0, "counts must be >= 0"),
            (n_tree + self.n_groups * self.group_size <= self.n_atoms,
             f"n_parents·(1+n_children) + n_groups·group_size = "
             f"{n_tree + self.n_groups * self.group_size} exceeds n_atoms={self.n_atoms}"),
            (0 < self.p_max <= 1, f"p_max must be in (0, 1], got {self.p_max}"),
            (0 <= self.child_prob <= 1, f"child_prob must be in [0, 1], got {self.child_prob}"),
            (0 <= self.rho < 1, f"rho must be in [0, 1), got {self.rho}"),
            (self.zipf_exponent >= 0 and self.noise >= 0 and self.offset >= 0,
             "zipf_exponent, noise and offset must be >= 0"),
            (0 < self.active < n_top * self.p_max * (1 + self.child_prob),
             f"active={self.active} is out of reach: it must be > 0 and below "
             f"{n_top * self.p_max * (1 + self.child_prob):g} with these counts and p_max"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"structured data: {message}")


@dataclasses.dataclass(frozen=True)
class Structure:
    """One draw of a spec's hidden truth.

    Attributes:
      spec, seed: what made it.
      atoms: (N, d) float32 unit-norm true feature directions.
      parent: (N,) int64, a child's parent id, else -1.
      group: (N,) int64, a correlated feature's group id, else -1.
      top_prob: (N,) float64, a top-level feature's firing probability (0 for children).
      freq: (N,) float64, every feature's expected firing frequency.
      bias: (d,) float32, added to every row.
    """

    spec: StructuredSpec
    seed: int
    atoms: np.ndarray
    parent: np.ndarray
    group: np.ndarray
    top_prob: np.ndarray
    freq: np.ndarray
    bias: np.ndarray

    @property
    def true_l0(self) -> float:
        return float(self.freq.sum())

    @property
    def mean_max_overlap(self) -> float:
        """Mean over atoms of the largest |cosine| with another atom (ρ_mm)."""
        cos = np.abs(self.atoms.astype(np.float64) @ self.atoms.T.astype(np.float64))
        np.fill_diagonal(cos, 0.0)
        return float(cos.max(axis=1).mean())


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def spread_atoms(atoms: np.ndarray, steps: int, lr: float = 0.01) -> np.ndarray:
    """Unit rows after `steps` of gradient descent on Σ_{i≠j} (a_i·a_j)², renormalising
    after each step: lowers the overlaps without making a regular (artificial) frame."""
    a = atoms.astype(np.float64)
    for _ in range(steps):
        gram = a @ a.T
        np.fill_diagonal(gram, 0.0)
        a = a - lr * 4.0 * gram @ a
        a = unit_vectors(a, axis=1)
    return a


def _scale_to_active(ranks: np.ndarray, weight: np.ndarray, spec: StructuredSpec) -> np.ndarray:
    """p = min(p_max, c·rank^-s) with c set (by bisection) so that Σ weight·p = active."""
    base = ranks.astype(np.float64) ** -spec.zipf_exponent
    lo, hi = 0.0, spec.p_max / base.min()  # at hi every feature sits at p_max
    for _ in range(100):
        c = 0.5 * (lo + hi)
        lo, hi = (c, hi) if (weight * np.minimum(spec.p_max, c * base)).sum() < spec.active \
            else (lo, c)
    return np.minimum(spec.p_max, 0.5 * (lo + hi) * base)


def make_structure(spec: StructuredSpec, seed: int = 0) -> Structure:
    """Draws the atoms, the hierarchy/group assignment and the frequencies of `spec`."""
    rng = _rng(seed, 0)
    n, n_par, n_kids = spec.n_atoms, spec.n_parents, spec.n_parents * spec.n_children
    atoms = rng.standard_normal((n, spec.d_in))
    atoms = spread_atoms(unit_vectors(atoms, axis=1), spec.orthogonalize_steps)
    parent = np.full(n, -1, np.int64)
    parent[n_par:n_par + n_kids] = np.repeat(np.arange(n_par), spec.n_children)
    group = np.full(n, -1, np.int64)
    first = n_par + n_kids
    group[first:first + spec.n_groups * spec.group_size] = np.repeat(
        np.arange(spec.n_groups), spec.group_size)
    top = parent < 0
    weight = np.where(np.arange(n) < n_par, 1.0 + spec.child_prob, 1.0)[top]
    top_prob = np.zeros(n)
    top_prob[top] = _scale_to_active(rng.permutation(int(top.sum())) + 1, weight, spec)
    freq = top_prob.copy()
    freq[~top] = top_prob[parent[~top]] * spec.child_prob / spec.n_children
    bias = spec.offset * rng.standard_normal(spec.d_in) / np.sqrt(spec.d_in)
    return Structure(spec, seed, atoms.astype(np.float32), parent, group, top_prob, freq,
                     bias.astype(np.float32))


def feature_kinds(structure: Structure) -> dict[str, np.ndarray]:
    """(N,) bool masks of the four kinds of feature: `parent`, `child`, `correlated` (in a
    group) and `independent` (the other top-level features)."""
    ids = np.arange(structure.spec.n_atoms)
    parent = ids < structure.spec.n_parents
    child = structure.parent >= 0
    correlated = structure.group >= 0
    return {"parent": parent, "child": child, "correlated": correlated,
            "independent": ~(parent | child | correlated)}


def _fires(structure: Structure, rng, n_rows: int) -> np.ndarray:
    """(n_rows, N) bool firing pattern of one chunk (module docstring; ids are contiguous
    blocks: parents, children, grouped, free)."""
    spec, p = structure.spec, structure.top_prob
    n_par, n_kids = spec.n_parents, spec.n_parents * spec.n_children
    g0, g1 = n_par + n_kids, n_par + n_kids + spec.n_groups * spec.group_size
    fires = np.zeros((n_rows, spec.n_atoms), bool)
    for lo, hi in ((0, n_par), (g1, spec.n_atoms)):  # independent top-level features
        fires[:, lo:hi] = rng.random((n_rows, hi - lo), np.float32) < p[lo:hi]
    if g1 > g0:
        shared = rng.standard_normal((n_rows, spec.n_groups), np.float32)
        own = rng.standard_normal((n_rows, g1 - g0), np.float32)
        latent = (np.sqrt(spec.rho) * np.repeat(shared, spec.group_size, axis=1)
                  + np.sqrt(1.0 - spec.rho) * own)
        fires[:, g0:g1] = latent < ndtri(p[g0:g1])
    if n_kids:
        u = rng.random((n_rows, n_par), np.float32)
        pick = np.minimum((u / max(spec.child_prob, 1e-30) * spec.n_children).astype(np.int64),
                          spec.n_children - 1)
        rows, parents = np.nonzero(fires[:, :n_par] & (u < spec.child_prob))
        fires[rows, n_par + parents * spec.n_children + pick[rows, parents]] = True
    return fires


def sample(structure: Structure, n_rows: int, stream: int = TRAIN_STREAM,
           start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows `[start, start + n_rows)` of `stream` and their true codes.

    Returns:
      `(rows (n_rows, d) float32, codes (n_rows, N) float32)`: codes[r, i] > 0 exactly when
      feature i fires in row r, and rows = codes @ atoms + bias (+ noise).
    """
    spec = structure.spec
    rows = np.empty((n_rows, spec.d_in), np.float32)
    codes = np.empty((n_rows, spec.n_atoms), np.float32)
    for chunk in range(start // CHUNK_ROWS, (start + n_rows - 1) // CHUNK_ROWS + 1):
        lo = chunk * CHUNK_ROWS
        rng = _rng(structure.seed, stream, chunk)
        on = _fires(structure, rng, CHUNK_ROWS)
        c = np.zeros(on.shape, np.float32)
        c[on] = rng.exponential(1.0, int(on.sum())) + 0.5
        x = c @ structure.atoms + structure.bias
        if spec.noise:
            x += spec.noise * rng.standard_normal(x.shape)
        a, b = max(start, lo), min(start + n_rows, lo + CHUNK_ROWS)
        rows[a - start:b - start] = x[a - lo:b - lo]
        codes[a - start:b - start] = c[a - lo:b - lo]
    return rows, codes


def write_rows(structure: Structure, path: str | Path, n_rows: int,
               stream: int = TRAIN_STREAM) -> Path:
    """Writes `n_rows` rows of `stream` to a .npy file chunk by chunk (codes not kept), so
    millions of rows never sit in memory twice."""
    path = Path(path)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                    shape=(n_rows, structure.spec.d_in))
    for lo in range(0, n_rows, CHUNK_ROWS):
        out[lo:lo + CHUNK_ROWS] = sample(structure, min(CHUNK_ROWS, n_rows - lo), stream, lo)[0]
    out.flush()
    del out
    return path


def structure_stats(structure: Structure, codes: np.ndarray) -> dict:
    """What a sample's codes show of the structure (the claims of the module docstring).

    Returns:
      `l0` (mean active features per row), `orphan_child_fires` (child firings in rows where
      its parent is off: 0 by construction), `siblings_together` (rows with two children of
      one parent on: 0), `group_phi` / `other_phi` (mean firing correlation of pairs within a
      correlated group / of other pairs of top-level non-parent features), `freq_max_over_
      median`, `top10_share` (share of all firings due to the 10 % most frequent features)
      and `mean_max_overlap` of the atoms.
    """
    on = codes > 0
    spec = structure.spec
    kids = np.flatnonzero(structure.parent >= 0)
    orphans = int((on[:, kids] & ~on[:, structure.parent[kids]]).sum())
    per_parent = on[:, kids].reshape(len(on), spec.n_parents, spec.n_children).sum(-1) \
        if len(kids) else np.zeros((len(on), 0))
    cols = np.flatnonzero((structure.parent < 0) & (np.arange(spec.n_atoms) >= spec.n_parents))
    phi = np.corrcoef(on[:, cols].T.astype(np.float64))
    g = structure.group[cols]
    same = (g[:, None] == g[None, :]) & (g[:, None] >= 0)
    off_diag = ~np.eye(len(cols), dtype=bool)
    freq = np.sort(on.mean(axis=0))[::-1]
    n_top10 = max(1, len(freq) // 10)
    return {
        "l0": float(on.sum(axis=1).mean()),
        "orphan_child_fires": orphans,
        "siblings_together": int((per_parent > 1).sum()),
        "group_phi": float(np.nanmean(phi[same & off_diag])) if same.any() else None,
        "other_phi": float(np.nanmean(phi[~same & off_diag])),
        "freq_max_over_median": float(freq[0] / max(np.median(freq), 1e-12)),
        "top10_share": float(freq[:n_top10].sum() / max(freq.sum(), 1e-12)),
        "mean_max_overlap": structure.mean_max_overlap,
    }
