"""Seed sweeps: `sae-jax train DATA RUN seed=0,1` trains several initialisations on one batch
order (a shared `data_seed`) in one pass, each member equal to a separate run (bitwise; with
`--batch-members`, one vmapped step, to float32 rounding); runs saved before `data_seed`
existed load and resume unchanged."""

import json
import shutil

import numpy as np
import pytest
from conftest import json_result, sae_jax_cli

import sae_jax
from sae_jax.config import config_from_dict, make_config
from sae_jax.errors import UserError
from sae_jax.training.grid import expand_grid, run_names
from sae_jax.training.sweep import train_sweep
from sae_jax.training.train import train

BASE = ["arch=topk", "width=64", "k=4", "steps=20", "batch_size=128", "log_every=10",
        "ckpt_every=10"]


def _params(run) -> dict:
    return {k: np.asarray(v) for k, v in sae_jax.load(run).params.items()}


def test_seed_sweep_shares_the_first_seed_as_data_seed(tmp_path):
    grid = expand_grid(["width=64", "seed=3,1,2"])
    assert run_names(grid) == ["seed=3", "seed=1", "seed=2"]
    cfgs = [make_config(p) for p in grid]
    assert [c.seed for c in cfgs] == [3, 1, 2] and {c.data_seed for c in cfgs} == {3}
    explicit = [make_config(p) for p in expand_grid(["seed=0,1", "data_seed=7"])]
    assert [(c.seed, c.data_seed) for c in explicit] == [(0, 7), (1, 7)]
    listed = tmp_path / "seeds.json"
    listed.write_text(json.dumps({"seed": [5, 6], "k": [4, 8]}))
    assert {make_config(p).data_seed for p in expand_grid([f"sweep={listed}"])} == {5}
    # a width sweep keeps its own batch order: data_seed follows the one seed
    assert {make_config(p).data_seed for p in expand_grid(["seed=4", "width=64,128"])} == {4}
    assert make_config(["seed=9"]).data_seed == 9


def test_members_of_different_data_seeds_are_refused(synthetic_store, tmp_path):
    cfgs = [make_config(BASE + [f"seed={s}"]) for s in (0, 1)]
    with pytest.raises(UserError, match="must share data_seed: 0 vs 1 .seeds differ"):
        train_sweep(cfgs, synthetic_store, tmp_path / "sweep", progress=False)


def test_seed_sweep_entry_point_equals_separate_runs(synthetic_store, tmp_path):
    """Through `sae-jax train`: each member holds, bitwise, the params of a separate run of
    its config (seed=1 with data_seed=0); the members differ in their initialisation. With
    `--batch-members` the same members, batched, to float32 rounding."""
    result = json_result(sae_jax_cli("train", synthetic_store, tmp_path / "sweep",
                                     *BASE, "seed=0,1"))
    assert [m["name"] for m in result["members"]] == ["seed=0", "seed=1"]
    members = {s: tmp_path / "sweep" / f"seed={s}" for s in (0, 1)}
    saved = {s: json.loads((members[s] / "config.json").read_text())["config"]
             for s in (0, 1)}
    assert [(saved[s]["seed"], saved[s]["data_seed"]) for s in (0, 1)] == [(0, 0), (1, 0)]
    for s, pairs in ((0, BASE), (1, BASE + ["seed=1", "data_seed=0"])):
        train(make_config(pairs), synthetic_store, tmp_path / f"alone{s}", progress=False)
        alone = _params(tmp_path / f"alone{s}")
        for key, value in _params(members[s]).items():
            np.testing.assert_array_equal(value, alone[key], err_msg=f"seed={s} {key}")
    a, b = _params(members[0]), _params(members[1])
    cos = np.sum(a["W_dec"] * b["W_dec"], 1) / (
        np.linalg.norm(a["W_dec"], axis=1) * np.linalg.norm(b["W_dec"], axis=1))
    assert np.abs(cos).mean() < 0.9  # other initial directions, not the same SAE
    # --batch-members: the two seeds as one vmapped step, equal to float32 rounding
    batched = json_result(sae_jax_cli("train", synthetic_store, tmp_path / "batched", *BASE,
                                      "seed=0,1", "--batch-members"))
    assert [m["name"] for m in batched["members"]] == ["seed=0", "seed=1"]
    for s in (0, 1):
        alone = _params(members[s])
        for key, value in _params(tmp_path / "batched" / f"seed={s}").items():
            np.testing.assert_allclose(value, alone[key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"batched seed={s} {key}")


def test_a_run_saved_before_data_seed_loads_and_resumes_identically(synthetic_store,
                                                                      tmp_path):
    """A config.json without `data_seed` reads as data_seed = seed, and resuming it from
    step 10 ends bitwise where the uninterrupted run ended."""
    pairs = BASE + ["seed=2"]
    full = tmp_path / "full"
    train(make_config(pairs), synthetic_store, full, progress=False)
    old = tmp_path / "old"
    shutil.copytree(full, old)
    record = json.loads((old / "config.json").read_text())
    del record["config"]["data_seed"]
    (old / "config.json").write_text(json.dumps(record))
    assert config_from_dict(record["config"]).data_seed == 2
    assert sae_jax.load(old).config == sae_jax.load(full).config
    shutil.rmtree(old / "checkpoints" / "20")
    assert sae_jax.load(old).step == 10
    train(make_config(pairs), synthetic_store, old, progress=False)
    expected = _params(full)
    for key, value in _params(old).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
