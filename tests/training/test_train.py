"""The training loop: it learns known atoms, trains in bf16, compiles once, keeps its
run directory consistent, resumes, and refuses a NaN loss."""

import json

import jax
import numpy as np
import pytest
from conftest import batch_at

import sae_jax
from sae_jax.config import make_config
from sae_jax.data.synthetic import atoms_recovered
from sae_jax.errors import UserError
from sae_jax.mesh import batch_sharding, make_mesh, replicated
from sae_jax.training.step import (
    compile_train_step,
    init_state,
    make_optimizer,
    make_train_step,
    state_shardings,
)
from sae_jax.training.train import train

ONE_DEVICE = jax.devices()[:1]


@pytest.mark.parametrize("arch, min_recovered", [
    ("topk", 0.95), ("batchtopk", 0.9), ("relu", 0.9), ("jumprelu", 0.8)])
def test_recovers_known_sparse_atoms(arch, min_recovered, synthetic, synthetic_store,
                                     tmp_path):
    """64 true atoms, 3 active per row on average; default hyper-parameters."""
    cfg = make_config(arch=arch, width=128, k=3, steps=1500, batch_size=512, log_every=500)
    metrics = train(cfg, synthetic_store, tmp_path / "run", progress=False, devices=ONE_DEVICE)
    sae = sae_jax.load(tmp_path / "run")
    recovered = atoms_recovered(np.asarray(sae.params["W_dec"]), synthetic[1])
    assert recovered >= min_recovered, (recovered, metrics)
    assert metrics["fvu"] < 0.35


def test_bf16_compute_trains(synthetic_store, tmp_path):
    cfg = make_config(arch="topk", width=128, k=3, steps=400, batch_size=512, log_every=50,
                      compute_dtype="bfloat16")
    train(cfg, synthetic_store, tmp_path / "run", progress=False, devices=ONE_DEVICE)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert records[-1]["fvu"] < 0.5 * records[0]["fvu"]
    assert sae_jax.load(tmp_path / "run").params["W_enc"].dtype == np.float32  # f32 master


def _dot_operand_types(cfg, d: int = 32) -> list[tuple[str, str]]:
    """The operand types of every matmul in the lowered train step (StableHLO)."""
    import re

    mesh = make_mesh("", ONE_DEVICE)
    tx = make_optimizer(cfg)
    _, sh = state_shardings(cfg, d, tx, mesh)
    state = jax.jit(lambda k: init_state(k, cfg, d, None, tx), out_shardings=sh)(
        jax.random.key(0))
    x = jax.device_put(np.ones((cfg.batch_size, d), np.float32), batch_sharding(mesh))
    hlo = compile_train_step(cfg, tx, mesh, sh, 1.0).lower(state, x).as_text()
    return re.findall(r"stablehlo\.dot_general[^\n]*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)",
                      hlo)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_bf16_runs_every_dense_matmul_in_bf16(arch):
    """compute_dtype=bfloat16: the forward matmuls *and* their transposes in the backward
    pass take bf16 operands (autodiff alone would run the backward ones in f32)."""
    cfg = make_config(arch=arch, width=64, batch_size=128, compute_dtype="bfloat16")
    dots = _dot_operand_types(cfg)
    big = [ops for ops in dots if all(o.count("x") >= 2 for o in ops)  # no mat-vecs
           and any("x64x" in o or "<64x" in o for o in ops)]
    # encode, decode, and the three backward matmuls (b_dec's encoder gradient is an f32
    # mat-vec, `common.centered_matmul`)
    assert len(big) >= 5, dots
    assert all(o.endswith("xbf16>") for ops in big for o in ops), big
    f32 = make_config(arch=arch, width=64, batch_size=128, compute_dtype="float32")
    assert all(o.endswith("xf32>") for ops in _dot_operand_types(f32) for o in ops)


def test_bf16_sparse_topk_encodes_in_bf16():
    cfg = make_config(arch="topk", width=64, k=4, batch_size=128, compute_dtype="bfloat16")
    assert ("tensor<128x32xbf16>", "tensor<32x64xbf16>") in _dot_operand_types(cfg)


def test_step_compiles_once(synthetic):
    """chex counts traces of the step function and jit's cache its compilations: a
    recompile (a changed shape, dtype or sharding between steps) fails here."""
    import chex

    cfg = make_config(arch="batchtopk", width=64, k=4, batch_size=64)
    mesh = make_mesh("data:2,model:4")
    tx = make_optimizer(cfg)
    _, sh = state_shardings(cfg, 32, tx, mesh)
    state = jax.jit(lambda k: init_state(k, cfg, 32, None, tx), out_shardings=sh)(
        jax.random.key(0))
    step = jax.jit(chex.assert_max_traces(make_train_step(cfg, tx, mesh, 1.0), n=1),
                   in_shardings=(sh, batch_sharding(mesh)), out_shardings=(sh, replicated(mesh)),
                   donate_argnums=0)
    for s in range(4):
        state, metrics = step(state, jax.device_put(batch_at(synthetic[0], cfg, s),
                                                    batch_sharding(mesh)))
    assert step._cache_size() == 1
    assert float(metrics["params_ok"]) == 1.0 and np.isfinite(float(metrics["loss"]))


def test_run_directory_and_resume(synthetic_store, tmp_path):
    run = tmp_path / "run"
    cfg = make_config(arch="topk", width=64, k=4, steps=20, batch_size=128, log_every=10,
                      ckpt_every=10)
    train(cfg, synthetic_store, run, progress=False)
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["width"] == 64 and saved["d_in"] == 32 and saved["input_scale"] > 0
    assert sae_jax.load(run).step == 20
    # Extending `steps` resumes from step 20; the scale is kept, not re-estimated.
    train(make_config(**{**cfg.to_dict(), "steps": 30}), synthetic_store, run, progress=False)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == [10, 20, 30]
    assert sae_jax.load(run).step == 30
    assert json.loads((run / "config.json").read_text())["input_scale"] == saved["input_scale"]


def test_resume_with_different_math_is_refused(synthetic_store, tmp_path):
    cfg = make_config(arch="topk", width=64, k=4, steps=10, batch_size=128)
    train(cfg, synthetic_store, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match=r"different config \(k: 4 -> 8, lr: "):
        train(make_config(arch="topk", width=64, k=8, steps=10, batch_size=128, lr=1e-3),
              synthetic_store, tmp_path / "run", progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synthetic_store, tmp_path):
    cfg = make_config(arch="relu", width=64, steps=5, batch_size=128, ckpt_every=1, log_every=1)
    train(cfg, synthetic_store, tmp_path / "run", progress=False)
    good = sae_jax.load(tmp_path / "run")
    bad = make_config(**{**cfg.to_dict(), "steps": 40})
    # Blow up the run by resuming it on a learning rate of 1e30 (lr is a math key, so
    # edit the saved config the way a careless user might).
    path = tmp_path / "run/config.json"
    saved = json.loads(path.read_text())
    saved["config"]["lr"] = 1e30
    path.write_text(json.dumps(saved))
    # One step at lr=1e30 leaves finite but absurd (±1e30) weights: refused before the save.
    with pytest.raises(UserError, match="updated params are not finite .* at step 6; the last "
                                        "good checkpoint \\(step 5\\) is kept"):
        train(make_config(**{**bad.to_dict(), "lr": 1e30}), synthetic_store, tmp_path / "run",
              progress=False)
    survivor = sae_jax.load(tmp_path / "run")
    assert survivor.step == good.step == 5
    for name, value in good.params.items():  # bitwise the last good state, not garbage
        np.testing.assert_array_equal(np.asarray(survivor.params[name]), np.asarray(value))
