"""`sae-jax diff`: a crosscoder's latents classed shared / A-only / B-only by relative decoder
norm, on two sources with planted shared and exclusive atoms, end to end through the
entry point (import two sources, train, diff)."""

import json

import numpy as np
import pytest
from conftest import json_result, one_error_line, sae_jax_cli

from sae_jax.analysis.diff import classify, cross_cosines, diff_decoders, relative_norms
from sae_jax.data.synthetic import two_source_data

D = 16


def test_thresholds_and_cosines_on_known_decoders():
    d_a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    d_b = np.array([[0.0, 0.0], [0.0, 2.0], [0.0, 9.5], [0.0, 0.0], [0.0, 0.25]])
    r = relative_norms(d_a, d_b)
    np.testing.assert_allclose(r[:3], [0.0, 2 / 3, 9.5 / 10.5])
    assert list(classify(r)) == ["A-only", "shared", "B-only", "empty", "mixed"]
    cos = cross_cosines(d_a, np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0, 0], [-1, 0]]))
    np.testing.assert_allclose(cos[[0, 1, 2, 4]], [1.0, 2**-0.5, 0.0, -1.0])
    assert np.isnan(cos[3]) and cross_cosines(d_a, d_b[:, :1]) is None
    out = diff_decoders(np.concatenate([d_a, d_b], 1), (2, 2), ["base", "chat"])
    assert out["counts"] == {"A-only": 1, "shared": 1, "B-only": 1, "mixed": 1, "empty": 1}
    assert out["latents"]["B-only"] == [2] and out["source_b"] == "chat"


@pytest.mark.entry
def test_diff_finds_the_planted_atoms_through_the_entry_point(tmp_path):
    rows, atoms, kinds = two_source_data(20_000, D, n_shared=16, n_exclusive=8, seed=1)
    np.save(tmp_path / "a.npy", rows[:, :D])
    np.save(tmp_path / "b.npy", rows[:, D:])
    json_result(sae_jax_cli("import", tmp_path / "a.npy", tmp_path / "b.npy",
                            tmp_path / "store", "--names", "base,chat"))
    json_result(sae_jax_cli("train", tmp_path / "store", tmp_path / "run", "arch=crosscoder",
                            "width=64", "batch_size=256", "steps=600", "lr=3e-3",
                            "mesh=data:2,model:4"))
    out = json_result(sae_jax_cli("diff", tmp_path / "run"))
    assert (out["source_a"], out["source_b"]) == ("base", "chat")
    result = json.loads((tmp_path / "run/diff/diff.json").read_text())
    assert (tmp_path / "run/diff/diff.png").read_bytes()[:4] == b"\x89PNG"
    # ≥ 90 % of the planted atoms are recovered (a latent at cosine ≥ 0.9), and each
    # recovered atom's best latent is in the class of the atom. (The sources' scales
    # differ by a few percent: a unit atom in raw units is compared in scaled units, as
    # the diff reads them.)
    import sae_jax

    W_dec = np.asarray(sae_jax.load(tmp_path / "run").params["W_dec"])
    cos = (W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)) @ atoms.T
    best, recovered = cos.argmax(0), cos.max(0) >= 0.9
    assert recovered.mean() >= 0.9, cos.max(0)
    found = {kind: [] for kind in ("shared", "A-only", "B-only")}
    for atom, latent in enumerate(best):
        if recovered[atom]:
            found[kinds[atom]].append(latent in result["latents"][kinds[atom]])
    assert all(np.mean(v) >= 0.9 for v in found.values()), found
    assert out["counts"]["A-only"] >= 8 and out["counts"]["B-only"] >= 8
    assert out["median_shared_cosine"] is not None
    line = one_error_line(sae_jax_cli("diff", tmp_path / "run", "--a", "nope"))
    assert "no source 'nope'; the run's sources are base, chat" in line
