"""`sae-jax diff`: a crosscoder's latents classed shared / A-only / B-only by relative decoder
norm, on two sources with planted shared and exclusive atoms, end to end through the
entry point (a two-source store with tokens, train, diff with its dashboard section)."""

import json

import numpy as np
import pytest
from conftest import json_result, one_error_line, sae_jax_cli

from sae_jax.analysis.diff import classify, cross_cosines, diff_decoders, relative_norms
from sae_jax.analysis.diff_dashboard import contributions
from sae_jax.data.store import StoreWriter
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


def test_contributions_add_up_to_the_pre_activation():
    """pre_A + pre_B + bias is the encoder's pre-activation; writes are f·‖d_s‖ in raw units."""
    import jax.numpy as jnp

    from sae_jax.config import make_config
    from sae_jax.saes.common import pre_activations

    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(7, 5)), "b_enc": rng.normal(size=5),
              "W_dec": rng.normal(size=(5, 7)), "b_dec": rng.normal(size=7)}
    x, lat, act = rng.normal(size=(4, 7)), np.array([0, 3, 3, 4]), rng.random(4)
    out = contributions(params, 2.0, ((0, 3), (3, 6)), x, lat, act)  # column 6: a third source
    pre = np.asarray(pre_activations({k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
                                     jnp.asarray(2.0 * x, jnp.float32), make_config(), None))
    np.testing.assert_allclose(out["pre_a"] + out["pre_b"] + out["bias"], pre[range(4), lat],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["pre_a"], ((2 * x - params["b_dec"]) * params["W_enc"][:, lat].T)
                               [:, :3].sum(1))
    np.testing.assert_allclose(out["write_b"],
                               act * np.linalg.norm(params["W_dec"][lat, 3:6], axis=1) / 2.0)


def two_source_store(path, rows):
    """A two-source store with MiniLM token ids and (doc, pos) of 50-token documents, as a
    two-model harvest writes one."""
    n = len(rows)
    tokens = np.random.default_rng(2).integers(1000, 20000, n)
    positions = np.stack([np.arange(n) // 50, np.arange(n) % 50], 1)
    meta = {"model": "all-MiniLM-L6-v2", "sources": [{"name": "base", "d": D},
                                                     {"name": "chat", "d": D}]}
    with StoreWriter(path, d_in=2 * D, meta=meta, with_tokens=True) as w:
        w.append(rows, tokens, positions)


@pytest.mark.entry
def test_diff_finds_the_planted_atoms_through_the_entry_point(tmp_path):
    rows, atoms, kinds = two_source_data(20_000, D, n_shared=16, n_exclusive=8, seed=1)
    two_source_store(tmp_path / "store", rows)
    json_result(sae_jax_cli("train", tmp_path / "store", tmp_path / "run", "arch=crosscoder",
                            "width=64", "batch_size=256", "steps=600", "lr=3e-3",
                            "mesh=data:2,model:4"))
    out = json_result(sae_jax_cli("diff", tmp_path / "run"))
    assert (out["source_a"], out["source_b"]) == ("base", "chat") and out["dashboard"] is None
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
    diff_dashboard(tmp_path, result)


def diff_dashboard(tmp_path, result):
    """`sae-jax diff RUN DATA`: the dashboard section, rendered by headless Chromium."""
    from test_dashboard import _browse, _console_errors

    out = json_result(sae_jax_cli("diff", tmp_path / "run", tmp_path / "store", "--out",
                                  tmp_path / "d", "--max-latents", 4, "--examples", 3))
    site = tmp_path / "d" / "dashboard"
    assert out["dashboard"]["index"] == str(site / "index.html")
    assert out["dashboard"]["shown"] == {"A-only": 4, "B-only": 4}
    text = (site / "diff.js").read_text()
    payload = json.loads(text[len("window.SAE_DIFF = "):].rstrip().rstrip(";"))
    catalog = json.loads((site / "feature_catalog.json").read_text())
    assert sorted(f["id"] for f in catalog["features"]) == sorted(map(int, payload["latents"]))
    b_only = payload["shown"]["B-only"][0]
    assert b_only in result["latents"]["B-only"]
    entry = payload["latents"][str(b_only)]
    feature = next(f for f in catalog["features"] if f["id"] == b_only)
    assert len(feature["top_examples"]) == 3 and feature["top_examples"][0]["tokens"][0]
    for e in entry["examples"]:  # a B-only latent writes (almost) nothing into base
        assert e["write_a"] < 0.12 * e["write_b"] and e["activation"] > 0
        assert e["pre_a"] + e["pre_b"] + e["bias"] == pytest.approx(e["activation"], abs=1e-3)
    res = _browse((site / "index.html").as_uri() + f"#feature-{b_only}", tmp_path, "--dump-dom")
    assert not _console_errors(res.stderr) and 'data-ready="1"' in res.stdout, res.stderr[-2000:]
    assert res.stdout.count('class="contrib"') >= 3 and "chat-only" in res.stdout
    res = _browse((site / "index.html").as_uri(), tmp_path, "--dump-dom")
    assert res.stdout.count('data-diff="B-only"') == 4 and "Model diff: base vs chat" in res.stdout


def test_planted_changes_of_the_minilm_diff_experiment():
    """`diff_minilm.py --plant embedding`'s generator (`experiments/diff_plant_embedding.py`):
    added sets move along their own orthogonal unit directions by strength x the set's mean
    row norm, a removed set loses exactly its shared direction, and nothing else changes; the
    added sets are disjoint draws from the commonest tokens, the removed set the common tokens
    furthest along the main direction; and `diff_minilm.py`'s "points at" rule."""
    from conftest import experiment

    exp = experiment("diff_plant_embedding")
    rng = np.random.default_rng(0)
    E = rng.normal(size=(40, 8)).astype(np.float32)
    other = rng.normal(size=(3, 3)).astype(np.float32)
    tensors = {exp.WORD_EMBEDDINGS: E, "other": other}
    new, plan = exp.plant_changes(tensors, [[1, 2], [3]], [[10, 11, 12]], strength=0.5)
    out = new[exp.WORD_EMBEDDINGS]
    assert new["other"] is other and out.dtype == np.float32
    untouched = np.setdiff1d(np.arange(40), [1, 2, 3, 10, 11, 12])
    np.testing.assert_array_equal(out[untouched], E[untouched])
    u0, u1, m = (p["direction"] for p in plan)
    assert [p["expected"] for p in plan] == ["B-only", "B-only", "A-only"]
    assert abs(u0 @ u1) < 1e-12 and np.isclose(np.linalg.norm(u0), 1)
    np.testing.assert_allclose(out[[1, 2]] - E[[1, 2]],
                               np.tile(0.5 * np.linalg.norm(E[[1, 2]], axis=1).mean() * u0,
                                       (2, 1)), atol=1e-5)
    np.testing.assert_allclose(m, (E[10:13].mean(0) - E.mean(0)) / np.linalg.norm(
        E[10:13].mean(0) - E.mean(0)), atol=1e-6)
    np.testing.assert_allclose(out[10:13] @ m, 0, atol=1e-5)  # the shared direction is gone
    delta = out[10:13] - E[10:13]  # and only it: the change is parallel to m
    np.testing.assert_allclose(delta - np.outer(delta @ m, m), 0, atol=1e-5)
    again, _ = exp.plant_changes(tensors, [[1, 2], [3]], [[10, 11, 12]], strength=0.5)
    np.testing.assert_array_equal(again[exp.WORD_EMBEDDINGS], out)
    counts = np.array([50, 0, 40, 30, 20, 10, 9, 8, 7, 6, 5, 1])
    sets = exp.choose_sets(counts, 2, 3, exclude=[2], pool=8)
    flat = sum(sets, [])
    assert [len(x) for x in sets] == [3, 3] and len(set(flat)) == 6
    assert set(flat) <= {0, 3, 4, 5, 6, 7, 8}  # the 8 commonest but the excluded and unseen
    assert exp.choose_sets(counts, 2, 3, exclude=[2], pool=8) == sets
    # the removed set: common tokens far along the main direction (here planted on 5 tokens)
    E2 = rng.normal(size=(40, 8))
    E2[[4, 6, 9, 12]] -= 9 * np.eye(8)[2]
    for sign in (1, -1):  # whatever sign the SVD gives, the long tail is the one taken
        picked = exp.principal_set(sign * E2, np.arange(40, 0, -1), 4, exclude=[6], pool=20)
        assert len(picked) == 4 and {4, 9, 12} <= set(picked) and 6 not in picked, picked
    # a latent points at a change: fired >= 10 times, half its top rows are rows of the
    # change (here: of its tokens) on 5+ different tokens
    rows = np.array([np.arange(20)] * 3)
    tokens = np.array([5] * 10 + [10, 11, 12, 13, 14] * 2)

    def of(*sets):
        return [np.isin(tokens, s) for s in sets]

    pointed = experiment("diff_minilm").pointed_changes
    assert pointed(rows, np.array([50, 9, 50]), tokens,
                   of([10, 11, 12, 13, 14], [5, 6])) == [0, None, 0]
    assert pointed(rows[:1], np.array([50]), tokens, of([10, 11, 12, 13], [5])) == [
        None]  # 10 rows of token 5 alone, or 4 distinct tokens: neither points


def _block(rng, d=8, d_ff=12):
    """A BERT MLP block 0 of width d_ff: neurons 3 and 7 sit in GELU's negative dip (the
    least used), neuron 5 fires on ~2 % of rows (x_0 > 2) whatever the token, neuron 9 fires
    harder but on one token's rows only (x_6 large), the rest are always on."""
    w_in = 0.01 * rng.normal(size=(d_ff, d))
    b_in = np.full(d_ff, 2.0)
    b_in[[3, 7]] = -0.75, -0.7
    w_in[5], b_in[5] = 5 * np.eye(d)[0], -10.0
    w_in[9], b_in[9] = 5 * np.eye(d)[6], -20.0
    w_out = rng.normal(size=(d, d_ff))
    w_out[:, 9] *= 10
    return {"encoder.layer.0.intermediate.dense.weight": w_in.astype(np.float32),
            "encoder.layer.0.intermediate.dense.bias": b_in.astype(np.float32),
            "encoder.layer.0.output.dense.weight": w_out.astype(np.float32),
            "other": np.ones(3, np.float32)}


def test_planted_mlp_changes_of_the_minilm_diff_experiment():
    """`diff_minilm.py --plant mlp`'s generator (`experiments/diff_plant_mlp.py`): the least
    used neurons are repurposed to fire on a token group's rows and write a new unit
    direction (orthogonal to the ones vector and to each other) of the asked median size; the
    removed neuron is the strongest selective one of many tokens, its output column zeroed;
    nothing else changes; the token groups are coherent, disjoint and seeded."""
    from conftest import experiment

    mlp = experiment("diff_plant_mlp")
    rng = np.random.default_rng(0)
    n, d = 4000, 8
    ids = rng.integers(0, 30, n)
    x = rng.normal(size=(n, d))
    x[:, 1:6] += 4 * np.eye(5)[ids // 6]  # 5 groups of 6 tokens, each with its own direction
    x[ids == 29, 6] += 10  # neuron 9's only token
    tensors = _block(rng)
    assert sorted(mlp.least_used(tensors, x, 2, block=0)) == [3, 7]
    assert mlp.selective_neuron(tensors, x, ids, exclude=[3, 7], block=0) == 5
    sets = mlp.token_sets(x, ids, 2, size=6, exclude=[0], min_count=15)
    groups = [set(range(g * 6, g * 6 + 6)) - {0} for g in range(5)]
    assert len(sets) == 2 and not set(sets[0]) & set(sets[1]) and 0 not in sum(sets, [])
    assert all(any(set(s) >= g and len(set(s) - g) <= 1 for g in groups) for s in sets), sets
    assert mlp.token_sets(x, ids, 2, size=6, exclude=[0], min_count=15) == sets
    new, plan = mlp.plant_mlp(tensors, x, ids, sets, [3, 7], 5, strength=0.5, block=0)
    w_in, b_in, w_out = mlp.names(0)
    assert new["other"] is tensors["other"] and new[w_out].dtype == np.float32
    kept = [i for i in range(12) if i not in (3, 5, 7)]
    np.testing.assert_array_equal(new[w_out][:, kept], tensors[w_out][:, kept])
    keep_in = [i for i in range(12) if i not in (3, 7)]
    np.testing.assert_array_equal(new[w_in][keep_in], tensors[w_in][keep_in])
    np.testing.assert_array_equal(new[b_in][keep_in], tensors[b_in][keep_in])
    assert [(p["kind"], p["expected"], p["neuron"]) for p in plan] == [
        ("added", "B-only", 3), ("added", "B-only", 7), ("removed", "A-only", 5)]
    np.testing.assert_array_equal(new[w_out][:, 5], 0)
    np.testing.assert_allclose(plan[2]["direction"], tensors[w_out][:, 5]
                               / np.linalg.norm(tensors[w_out][:, 5]), atol=1e-6)
    u0, u1 = plan[0]["direction"], plan[1]["direction"]
    assert abs(u0 @ u1) < 1e-9 and abs(u0.sum()) < 1e-9 and np.isclose(u0 @ u0, 1)
    rows = mlp.change_rows(tensors, new, x, plan, block=0)
    for j, p in enumerate(plan[:2]):
        h = mlp.activations(new, x, [p["neuron"]], block=0)[:, 0]
        fired = h > 0
        assert abs(fired.mean() - mlp.FIRE_SHARE) < 0.005 and p["fires_on"] == fired.mean()
        assert np.isin(ids[fired], p["token_ids"]).mean() > 0.9  # it fires on its group
        np.testing.assert_allclose(new[w_out][:, p["neuron"]] / np.linalg.norm(
            new[w_out][:, p["neuron"]]), p["direction"], atol=1e-6)
        write = np.median(h[fired]) * np.linalg.norm(new[w_out][:, p["neuron"]])
        assert write == pytest.approx(0.5 * np.linalg.norm(x, axis=1).mean(), rel=1e-3)
        assert rows[j].sum() > 0 and not (rows[j] & ~fired).any()
    h5 = mlp.activations(tensors, x, [5], block=0)[:, 0]
    np.testing.assert_array_equal(rows[2], h5 >= 0.25 * h5.max())
    again, _ = mlp.plant_mlp(tensors, x, ids, sets, [3, 7], 5, strength=0.5, block=0)
    np.testing.assert_array_equal(again[w_out], new[w_out])
