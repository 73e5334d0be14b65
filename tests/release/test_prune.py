"""`sae-jax prune`: exactly the planted dead and duplicate latents go, the width cut never
breaks the FVU budget, and the pruned run is a run like any other (load, eval, export,
dashboard) with its catalog's ids mapped."""

import json

import jax
import numpy as np
import pytest
from conftest import json_result, sae_jax_cli

from sae_jax import cli, saes
from sae_jax.analysis.catalog import FeatureCatalog, read_catalog, write_catalog
from sae_jax.config import make_config
from sae_jax.data.synthetic import sparse_dictionary_data
from sae_jax.release import pruning
from sae_jax.rundir import PRUNED_FROM, RunInfo
from sae_jax.sae import SAE, load
from sae_jax.saelens.import_sae import write_params_run

N_ATOMS, D, N_ROWS = 32, 64, 20_000
DEAD = [32, 34, 36]  # planted: never fire
DUPLICATES = {33: 3, 35: 10, 37: 20}  # planted duplicate -> the atom latent it copies


def planted_params(atoms: np.ndarray, rows: np.ndarray) -> dict:
    """A JumpReLU SAE whose first 32 latents read and write the true atoms (the encoder is
    their pseudo-inverse, so it reconstructs the rows all but exactly), plus three dead
    latents and three rarer, near-parallel (cos ≈ 0.98), weak copies of atoms 3, 10, 20."""
    rng = np.random.default_rng(1)
    w_enc = np.concatenate([np.linalg.pinv(atoms), np.zeros((D, 6))], axis=1)
    b_enc = np.zeros(N_ATOMS + 6)
    w_dec = np.concatenate([atoms, np.zeros((6, D))])
    for i in DEAD:
        w_enc[:, i], b_enc[i] = rng.standard_normal(D), -100.0
        w_dec[i] = rng.standard_normal(D) / np.sqrt(D)
    for i, j in DUPLICATES.items():
        w_enc[:, i], b_enc[i] = w_enc[:, j], -0.5
        noisy = atoms[j] + 0.2 * rng.standard_normal(D) / np.sqrt(D)
        w_dec[i] = 0.02 * noisy / np.linalg.norm(noisy)
    mean_code = 3.0 / N_ATOMS * 1.5  # each atom: on with p = active / n_atoms, E[c] = 1.5
    b_dec = rows.mean(0) - mean_code * atoms.sum(0)
    params = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec,
              "log_threshold": np.full(N_ATOMS + 6, np.log(0.25))}
    return {k: v.astype(np.float32) for k, v in params.items()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(store dir, run dir, rows): a planted run on its own synthetic store (32 atoms in
    d=64), with a catalog that labels each latent by its id."""
    from sae_jax.data.importers import import_activations

    rows, atoms = sparse_dictionary_data(N_ROWS, D, N_ATOMS, active=3.0, seed=3)
    base = tmp_path_factory.mktemp("prune")
    np.save(base / "x.npy", rows)
    store = import_activations(base / "x.npy", base / "store")
    cfg = make_config(arch="jumprelu", width=N_ATOMS + 6)
    run = base / "run"
    write_params_run(run, RunInfo(cfg, D, 1.0, str(store.path), store_id=store.id),
                     planted_params(atoms, rows), step=7)
    header = {"format": "sae_jax feature catalog", "version": 1, "width": N_ATOMS + 6,
              "run": str(run), "n_rows": 10, "n_features": N_ATOMS + 6}
    write_catalog(FeatureCatalog(header, [{"id": i, "label": f"latent {i}", "count": 1}
                                          for i in range(N_ATOMS + 6)]), run)
    return base / "store", run, rows


def prune_in_process(capsys, *args) -> tuple[int, dict | str]:
    """`sae-jax prune ARGS` through `cli.main`: (status, result JSON or the stderr)."""
    status = cli.main(["prune", *map(str, args), "--bench-rounds", "1"])
    out, err = capsys.readouterr()
    return status, (json.loads(out.splitlines()[-1]) if status == 0 else err)


def test_cli_drops_exactly_the_planted_latents(planted, tmp_path, capsys):
    store, run, _ = planted
    out = tmp_path / "pruned"
    result = json_result(sae_jax_cli("prune", run, out, "--bench-rounds", "1"))
    assert result["width_before"] == N_ATOMS + 6 and result["width_after"] == N_ATOMS
    assert result["dropped"] == result["candidates"] == {"dead": 3, "duplicate": 3, "width": 0}
    assert result["fvu_increase"] <= result["fvu_budget"] == 0.01
    assert result["fvu_before"] < 1e-3 and result["train_rows"] == 19_000
    assert result["extraction"]["speedup"] > 0
    assert result["downstream_note"].startswith("skipped: downstream fidelity needs a store ")
    record = json.loads((out / PRUNED_FROM).read_text())
    assert record["new_to_old"] == list(range(N_ATOMS)) and record["report"] == result
    dropped = {d["id"]: d for d in record["dropped"]}
    assert sorted(i for i, d in dropped.items() if d["reason"] == "dead") == DEAD
    assert {i: d["kept"] for i, d in dropped.items() if d["reason"] == "duplicate"} == DUPLICATES
    # The pruned run: loads (the atoms, untouched), its catalog is mapped, it evals, exports.
    sae = load(out)
    assert sae.step == 7 and sae.config.width == N_ATOMS
    np.testing.assert_array_equal(np.asarray(sae.params["W_dec"]),
                                  np.asarray(load(run).params["W_dec"])[:N_ATOMS])
    catalog = read_catalog(out)
    assert [f["label"] for f in catalog.features] == [f"latent {i}" for i in range(N_ATOMS)]
    assert catalog.header["width"] == N_ATOMS
    assert catalog.header["pruned_from"]["width"] == N_ATOMS + 6
    assert cli.main(["eval", str(out), str(store)]) == 0
    evaluated = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert evaluated["fvu"] == pytest.approx(result["fvu_after"], abs=1e-9)
    assert cli.main(["export", str(out), str(tmp_path / "export")]) == 0
    cfg = json.loads((tmp_path / "export" / "cfg.json").read_text())
    assert cfg["d_sae"] == N_ATOMS and (tmp_path / "export" / "feature_catalog.json").is_file()


def test_width_cut_never_exceeds_the_fvu_budget(planted, tmp_path, capsys):
    _, run, _ = planted
    budget = 0.1  # each atom carries ~1/32 of the variance: about 3 of them fit
    status, got = prune_in_process(capsys, run, tmp_path / "tight", "--width", 8,
                                   "--fvu-budget", budget)
    assert status == 0, got
    assert got["stopped_by_budget"] and 8 < got["width_after"] < N_ATOMS
    assert 0 < got["fvu_increase"] <= budget
    assert got["dropped"] == {"dead": 3, "duplicate": 3, "width": N_ATOMS - got["width_after"]}
    status, loose = prune_in_process(capsys, run, tmp_path / "loose", "--width", 8,
                                     "--fvu-budget", 10)
    assert status == 0 and loose["width_after"] == 8 and not loose["stopped_by_budget"]
    assert loose["fvu_increase"] > 0.1


def test_removal_sse_is_the_exact_single_removal_increase(planted):
    _, run, rows = planted
    sae = load(run)
    rows = rows[:2000]
    delta = pruning.removal_sse(sae, rows, batch_size=512)

    def sse(s):
        return float(np.sum((rows - np.asarray(s(rows))) ** 2, dtype=np.float64))

    for i in (0, 5, DEAD[0], next(iter(DUPLICATES))):
        keep = pruning.kept_latents(sae.width, [i])
        cut = SAE(pruning.pruned_config(sae.config, keep),
                  pruning.slice_latents(sae.params, keep, sae.config), 1.0, 0)
        assert delta[i] == pytest.approx(sse(cut) - sse(sae), rel=1e-3, abs=1e-3)
    assert delta[DEAD[0]] == 0 and delta[:N_ATOMS].min() > 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_slicing_keeps_the_surviving_latents(arch):
    cfg = make_config(arch=arch, width=32, k=4, matryoshka_widths=(4, 12))
    params = jax.jit(lambda key: saes.init(key, cfg, 16))(jax.random.key(0))
    if arch in ("batchtopk", "matryoshka"):
        params["threshold"] = np.float32(0.1)
    keep = np.array([0, 2, 3, 5, 8, 13, 20, 21, 30])
    new_cfg = pruning.pruned_config(cfg, keep)
    sliced = pruning.slice_latents(params, keep, cfg)
    assert new_cfg.width == 9 and sliced["W_enc"].shape == (16, 9)
    assert sliced["W_dec"].shape == (9, 16) and sliced["b_dec"].shape == (16,)
    if arch == "matryoshka":
        assert new_cfg.matryoshka_widths == (3, 5, 9) and new_cfg.k == 4
    if arch == "jumprelu":
        np.testing.assert_array_equal(sliced["log_threshold"], params["log_threshold"][keep])
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    old = np.asarray(jax.jit(lambda p: saes.encode(p, x, cfg).f)(params))[:, keep]
    new = np.asarray(jax.jit(lambda p: saes.encode(p, x, new_cfg).f)(sliced))
    if arch == "topk":  # freed slots go to the next latents; what fired keeps its value
        new = np.where(old > 0, new, 0.0)
    np.testing.assert_allclose(new, old, atol=1e-6)
    assert pruning.prefix_levels((4, 12, 32), np.array([5, 8, 30])) == (2, 3)


def test_duplicates_keep_the_more_frequent():
    w = np.eye(4)[[0, 0, 1, 2, 2, 2, 3]] + 0.01 * np.arange(7)[:, None]
    fires = np.array([5, 9, 3, 1, 7, 7, 2])
    got = pruning.duplicate_latents(w, fires, np.arange(7), 0.9)
    pairs = {d["id"]: d["kept"] for d in got}
    assert pairs[0] == 1 and 2 not in pairs and 6 not in pairs
    assert set(pairs) - {0} in ({3, 5}, {3, 4}) and pairs[3] in (4, 5)
    assert all(d["cosine"] >= 0.9 for d in got)
    assert pruning.duplicate_latents(w, fires, np.arange(7), 1.0) == []


def test_bad_input_is_one_line(planted, tmp_path, capsys):
    store, run, rows = planted
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    topk = tmp_path / "topk"
    params = planted_params(sparse_dictionary_data(10, D, N_ATOMS, seed=3)[1], rows)
    del params["log_threshold"]
    write_params_run(topk, RunInfo(make_config(arch="topk", width=N_ATOMS + 6, k=8), D, 1.0,
                                   str(store)), params)
    cases = [((run, taken), "exists and is not empty"),
             ((run, tmp_path / "a", "--width", 39), "larger than the SAE's width 38"),
             ((tmp_path / "nothing", tmp_path / "b"), "no run at"),
             ((run, tmp_path / "c", "--fvu-budget", -1), "--fvu-budget must be >= 0"),
             ((topk, tmp_path / "d", "--width", 7), "below the fewest latents a topk SAE can "
                                                     "keep (8: each row takes its top k=8)")]
    for args, message in cases:
        status, err = prune_in_process(capsys, *args)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and message in lines[0], err
    assert (taken / "x").read_text() == "mine"
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_topk_keeps_k_latents():
    cfg = make_config(arch="topk", width=16, k=8)
    order = pruning.removal_order(np.arange(16), [], {}, None, 16, pruning.min_width(cfg))
    assert [c["id"] for c in order] == list(range(8))
    assert pruning.min_width(make_config(arch="batchtopk", width=16, k=8)) == 1
    assert pruning.pruned_config(make_config(arch="batchtopk", width=16, k=8),
                                 np.arange(5)).k == 5

