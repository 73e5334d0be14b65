"""Activations with a known sparse dictionary, for tests, demos and benchmarks.

Each row is a sparse non-negative combination of unit-norm ground-truth atoms, so one can
check that a trained SAE *recovers* them (decoder rows aligned with the true atoms).
"""

from __future__ import annotations

import numpy as np


def _atoms(rng, n_atoms: int, d: int) -> np.ndarray:
    atoms = rng.standard_normal((n_atoms, d))
    return atoms / np.linalg.norm(atoms, axis=1, keepdims=True)


def _codes(rng, n_rows: int, n_atoms: int, active: float) -> np.ndarray:
    """Each atom fires independently with probability `active / n_atoms`, magnitude
    Exp(1) + 0.5, so features are clearly on or off."""
    on = rng.random((n_rows, n_atoms)) < active / n_atoms
    return on * (rng.exponential(1.0, (n_rows, n_atoms)) + 0.5)


def sparse_dictionary_data(n_rows: int, d_in: int, n_atoms: int, active: float = 3.0,
                           seed: int = 0, noise: float = 0.0, offset: float = 1.0):
    """Samples rows x = offset·u + Σ_i c_i·a_i with ~`active` atoms per row.

    Returns:
      `(rows (n_rows, d_in) float32, atoms (n_atoms, d_in) float32)`.
    """
    rng = np.random.default_rng(seed)
    atoms = _atoms(rng, n_atoms, d_in)
    coeffs = _codes(rng, n_rows, n_atoms, active)
    bias = offset * rng.standard_normal(d_in) / np.sqrt(d_in)
    rows = coeffs @ atoms + bias + noise * rng.standard_normal((n_rows, d_in))
    return rows.astype(np.float32), atoms.astype(np.float32)


def sparse_transcoder_data(n_rows: int, d_in: int, d_out: int, n_atoms: int,
                           active: float = 3.0, seed: int = 0):
    """Input/target pairs that share one sparse code: x = Σ c_i·a_i, y = Σ c_i·b_i + bias.

    The map x -> y is sparse and known: a transcoder should find the input atoms `a_i` in
    its encoder and the output atoms `b_i` in its decoder.

    Returns:
      `(x (n_rows, d_in), y (n_rows, d_out), atoms_in (n_atoms, d_in),
      atoms_out (n_atoms, d_out))`, float32.
    """
    rng = np.random.default_rng(seed)
    atoms_in, atoms_out = _atoms(rng, n_atoms, d_in), _atoms(rng, n_atoms, d_out)
    coeffs = _codes(rng, n_rows, n_atoms, active)
    bias = rng.standard_normal(d_out) / np.sqrt(d_out)
    return tuple(a.astype(np.float32) for a in
                 (coeffs @ atoms_in, coeffs @ atoms_out + bias, atoms_in, atoms_out))


SHARED, A_ONLY, B_ONLY = "shared", "A-only", "B-only"


def two_source_data(n_rows: int, d: int, n_shared: int, n_exclusive: int,
                    active: float = 3.0, seed: int = 0):
    """Two aligned sources (e.g. a base and a fine-tuned model) with a planted diff: rows
    `[x_A | x_B]` of width 2d built from `n_shared` atoms present in both sources (a random
    direction in each, equal norms) and `n_exclusive` atoms in A only and as many in B only.

    A crosscoder should give each shared atom a latent whose decoder norm splits evenly
    between the sources, and each exclusive atom one that writes to its own source only.

    Returns:
      `(rows (n_rows, 2d) float32, atoms (n_atoms, 2d) float32 of unit norm, kinds)`, where
      `kinds[i]` is `SHARED`, `A_ONLY` or `B_ONLY`.
    """
    rng = np.random.default_rng(seed)
    n_atoms = n_shared + 2 * n_exclusive
    a, b = _atoms(rng, n_atoms, d), _atoms(rng, n_atoms, d)
    kinds = [SHARED] * n_shared + [A_ONLY] * n_exclusive + [B_ONLY] * n_exclusive
    in_a = np.array([k != B_ONLY for k in kinds], float)[:, None]
    in_b = np.array([k != A_ONLY for k in kinds], float)[:, None]
    atoms = np.concatenate([a * in_a, b * in_b], axis=1)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    rows = _codes(rng, n_rows, n_atoms, active) @ atoms
    return rows.astype(np.float32), atoms.astype(np.float32), kinds


def cross_layer_data(n_rows: int, d: int, n_layers: int, n_atoms: int, active: float = 2.0,
                     seed: int = 0):
    """A known sparse multi-layer map, as a CLT store row: `[x_1 | … | x_L | y_1 | … | y_L]`.

    Layer l has `n_atoms` atoms with sparse codes c_l; its input is x_l = c_l @ A_l, and
    atom i of layer l writes to every output y_t, t ≥ l, through its own block B_{l,t}:
    y_t = Σ_{l ≤ t} c_l @ B_{l,t} + bias. Each atom's planted decoder is the row
    `[0 … 0 | B_{l,l}[i] | … | B_{l,L−1}[i]]` of width L·d, of unit norm (equal parts per
    target); a CLT should learn it in a latent of layer l.

    Returns:
      `(rows (n_rows, 2·L·d), decoders (L·n_atoms, L·d), layer_of (L·n_atoms,))`, float32
      rows and decoders, atoms of layer l at `layer_of == l`.
    """
    rng = np.random.default_rng(seed)
    codes = [_codes(rng, n_rows, n_atoms, active) for _ in range(n_layers)]
    inputs = [c @ _atoms(rng, n_atoms, d) for c in codes]
    decoders = np.zeros((n_layers, n_atoms, n_layers, d))
    for layer in range(n_layers):
        for target in range(layer, n_layers):
            decoders[layer, :, target] = _atoms(rng, n_atoms, d) / np.sqrt(n_layers - layer)
    outputs = sum(c @ decoders[layer].reshape(n_atoms, -1) for layer, c in enumerate(codes))
    outputs = outputs + rng.standard_normal(n_layers * d) / np.sqrt(d)
    rows = np.concatenate([*inputs, outputs], axis=1)
    layer_of = np.repeat(np.arange(n_layers), n_atoms)
    return (rows.astype(np.float32), decoders.reshape(n_layers * n_atoms, -1).astype(np.float32),
            layer_of)


def atoms_recovered(W_dec: np.ndarray, atoms: np.ndarray, threshold: float = 0.9) -> float:
    """Fraction of true atoms whose best-matching decoder row has cosine ≥ `threshold`."""
    W = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), 1e-12)
    cos = atoms @ W.T
    return float(np.mean(cos.max(axis=1) >= threshold))


def main(argv: list[str] | None = None) -> None:
    """`make OUT_DIR` writes rows.npy + atoms.npy; `check RUN_DIR ATOMS` prints (as JSON)
    the fraction of true atoms a trained SAE recovered."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m sae_jax.data.synthetic", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make")
    make.add_argument("out_dir")
    make.add_argument("--rows", type=int, default=200_000)
    make.add_argument("--d-in", type=int, default=64)
    make.add_argument("--atoms", type=int, default=256)
    make.add_argument("--active", type=float, default=4.0)
    make.add_argument("--seed", type=int, default=0)
    check = sub.add_parser("check")
    check.add_argument("run_dir")
    check.add_argument("atoms")
    args = p.parse_args(argv)
    if args.command == "make":
        rows, atoms = sparse_dictionary_data(args.rows, args.d_in, args.atoms, args.active,
                                             args.seed)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "rows.npy", rows)
        np.save(out / "atoms.npy", atoms)
    else:
        import sae_jax

        W_dec = np.asarray(sae_jax.load(args.run_dir).params["W_dec"])
        atoms = np.load(args.atoms, allow_pickle=False)
        print(json.dumps({"atoms_recovered": atoms_recovered(W_dec, atoms)}))


if __name__ == "__main__":
    main()
