"""The structured synthetic data is what its docstring says: children fire only with their
parent, groups co-fire, frequencies are heavy-tailed, and rows are a pure function of the
seed, stream and row index."""

import numpy as np
import pytest

from sae_jax.data.structured import (
    CHUNK_ROWS,
    HELDOUT_STREAM,
    TRAIN_STREAM,
    StructuredSpec,
    feature_kinds,
    make_structure,
    sample,
    structure_stats,
    write_rows,
)
from sae_jax.errors import UserError

SPEC = StructuredSpec()


@pytest.fixture(scope="module")
def drawn():
    structure = make_structure(SPEC, seed=0)
    rows, codes = sample(structure, 20_000, HELDOUT_STREAM)
    return structure, rows, codes


def test_rows_are_the_codes_times_the_unit_atoms(drawn):
    structure, rows, codes = drawn
    assert rows.shape == (20_000, SPEC.d_in) and codes.shape == (20_000, SPEC.n_atoms)
    np.testing.assert_allclose(np.linalg.norm(structure.atoms, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(rows, codes @ structure.atoms + structure.bias, atol=1e-4)
    assert codes[codes > 0].min() >= 0.5  # magnitudes Exp(1) + 0.5: clearly on or off


def test_children_fire_only_with_their_parent_one_at_a_time(drawn):
    structure, _, codes = drawn
    stats = structure_stats(structure, codes)
    assert stats["orphan_child_fires"] == 0 and stats["siblings_together"] == 0
    on = codes > 0
    kids = np.flatnonzero(structure.parent >= 0)
    assert len(kids) == SPEC.n_parents * SPEC.n_children and on[:, kids].sum() > 1000
    parent_on = on[:, :SPEC.n_parents]
    any_child = on[:, kids].reshape(len(on), SPEC.n_parents, SPEC.n_children).any(-1)
    # P(some child | parent) is child_prob (the hierarchy is not degenerate)
    assert any_child[parent_on].mean() == pytest.approx(SPEC.child_prob, abs=0.03)


def test_feature_kinds_partition_the_features(drawn):
    kinds = feature_kinds(drawn[0])
    assert (sum(m.astype(int) for m in kinds.values()) == 1).all()
    assert kinds["parent"].sum() == SPEC.n_parents
    assert kinds["correlated"].sum() == SPEC.n_groups * SPEC.group_size


def test_groups_co_fire_and_others_do_not(drawn):
    stats = structure_stats(drawn[0], drawn[2])
    assert stats["group_phi"] > 0.2 and abs(stats["other_phi"]) < 0.01


def test_frequencies_are_heavy_tailed_and_sum_to_the_true_l0(drawn):
    structure, _, codes = drawn
    stats = structure_stats(structure, codes)
    assert structure.true_l0 == pytest.approx(SPEC.active)
    assert stats["l0"] == pytest.approx(SPEC.active, rel=0.03)
    assert stats["freq_max_over_median"] > 15 and stats["top10_share"] > 0.35
    np.testing.assert_allclose((codes > 0).mean(axis=0), structure.freq, atol=0.01)
    flat = make_structure(StructuredSpec(zipf_exponent=0.0, n_parents=0, n_groups=0), seed=0)
    assert flat.freq.max() == pytest.approx(flat.freq.min())


def test_rows_are_a_function_of_seed_stream_and_index(tmp_path):
    spec = StructuredSpec(d_in=16, n_atoms=64, active=3.0, n_parents=4, n_groups=4)
    structure = make_structure(spec, seed=3)
    rows, _ = sample(structure, 100, TRAIN_STREAM, start=CHUNK_ROWS - 50)
    path = write_rows(structure, tmp_path / "x.npy", CHUNK_ROWS + 50)
    np.testing.assert_array_equal(np.load(path, allow_pickle=False)[-100:], rows)
    other, _ = sample(structure, 100, HELDOUT_STREAM, start=CHUNK_ROWS - 50)
    assert not np.allclose(other, rows)
    assert not np.allclose(make_structure(spec, seed=4).atoms, structure.atoms)


def test_spreading_lowers_the_overlap():
    plain = make_structure(SPEC, seed=0).mean_max_overlap
    assert make_structure(StructuredSpec(orthogonalize_steps=30), seed=0).mean_max_overlap \
        < plain - 0.02


@pytest.mark.parametrize("bad", [dict(rho=1.0), dict(n_parents=60), dict(active=500.0),
                                 dict(child_prob=1.5)])
def test_bad_specs_are_refused_in_one_line(bad):
    with pytest.raises(UserError, match="structured data"):
        StructuredSpec(**bad)
