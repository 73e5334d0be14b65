"""MCC and F1 against the truth: 1 for the true dictionary and codes, low for random ones."""

import dataclasses

import numpy as np
import pytest
from conftest import relu_sae

from sae_jax.analysis.ground_truth import firing_f1, mcc, score_sae
from sae_jax.data.structured import (
    HELDOUT_STREAM,
    StructuredSpec,
    feature_kinds,
    make_structure,
    sample,
)
from sae_jax.errors import UserError
from sae_jax.sae import SAE

SPEC = StructuredSpec(d_in=64, n_atoms=32, active=3.0, n_parents=4, n_children=3, n_groups=2,
                      offset=0.0)


@pytest.fixture(scope="module")
def orthogonal_truth():
    """A structure whose 32 atoms are orthonormal and no offset, so a ReLU SAE with
    W_enc = atomsᵀ and W_dec = atoms encodes every row's true code exactly."""
    structure = make_structure(SPEC, seed=0)
    q = np.linalg.qr(np.random.default_rng(1).standard_normal((SPEC.d_in, SPEC.n_atoms)))[0]
    structure = dataclasses.replace(structure, atoms=q.T.astype(np.float32))
    rows, codes = sample(structure, 4096, HELDOUT_STREAM)
    return structure, rows, codes


def exact_sae(w_dec: np.ndarray) -> SAE:
    """W_enc = W_decᵀ, b_dec = 0 (the data has no offset); b_enc = -1e-4 keeps float32
    rounding (~1e-7) of an off feature off."""
    return relu_sae(w_dec.T, np.full(len(w_dec), -1e-4), w_dec)


def test_mcc_is_1_for_the_true_dictionary_in_any_order_and_scale():
    atoms = make_structure(StructuredSpec(), seed=0).atoms
    perm = np.random.default_rng(0).permutation(len(atoms))
    scale = np.random.default_rng(1).uniform(0.1, 3.0, (len(atoms), 1))
    out = mcc(atoms[perm] * scale, atoms)
    assert out["mcc"] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(perm[out["partner"]], np.arange(len(atoms)))


def test_mcc_is_low_for_a_random_dictionary_and_counts_missing_latents_as_0():
    atoms = make_structure(StructuredSpec(), seed=0).atoms
    random = np.random.default_rng(0).standard_normal(atoms.shape)
    assert mcc(random, atoms)["mcc"] < 0.4
    # signed: a latent pointing at -a_i is not feature i (|cosine| would score this 1)
    assert mcc(-atoms, atoms)["mcc"] < 0.4
    half = mcc(atoms[:128], atoms)
    assert half["mcc"] == pytest.approx(0.5, abs=1e-5) and (half["partner"] == -1).sum() == 128
    with pytest.raises(UserError):
        mcc(atoms[:, :10], atoms)


def test_firing_f1_by_hand():
    true_on = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], bool)
    latent_on = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]], bool)
    out = firing_f1(true_on, latent_on)
    # feature 0: tp 1, fired 2, latent 2 -> P = R = 1/2; feature 1: tp 1, P = 1/3, R = 1/2
    np.testing.assert_allclose(out["f1"][:2], [0.5, 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)])
    assert np.isnan(out["f1"][2])  # never truly fires: not scored


def test_score_is_perfect_for_the_true_sae_and_low_for_a_random_one(orthogonal_truth):
    structure, rows, codes = orthogonal_truth
    true = score_sae(exact_sae(structure.atoms), structure.atoms, rows, codes,
                     feature_kinds(structure))
    assert true["mcc"] == pytest.approx(1.0, abs=1e-5)
    for kind in ("parent", "child", "correlated", "independent"):
        assert true[f"mcc_{kind}"] == pytest.approx(1.0, abs=1e-5) and true[f"f1_{kind}"] == 1
    assert true["f1"] == pytest.approx(1.0) and true["atoms_recovered"] == 1.0
    assert true["fvu"] < 1e-4 and true["l0"] == pytest.approx((codes > 0).sum(1).mean())
    assert true["n_scored"] == SPEC.n_atoms
    random = np.random.default_rng(2).standard_normal(structure.atoms.shape)
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    bad = score_sae(exact_sae(random.astype(np.float32)), structure.atoms,
                    rows, codes)
    assert bad["mcc"] < 0.5 and bad["f1"] < 0.3 and bad["atoms_recovered"] == 0.0
