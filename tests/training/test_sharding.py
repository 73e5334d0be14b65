"""Sharding: the same numbers on every mesh, a snapshot of the sharding plan, and memory
that shrinks with the model axis."""

import jax
import numpy as np
import pytest
from conftest import MESHES, batch_at, mesh_devices
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax import saes
from sae_jax.config import make_config
from sae_jax.mesh import make_mesh
from sae_jax.saes.select import kth_largest, topk_mask
from sae_jax.training.step import (
    compile_train_step,
    init_state,
    make_optimizer,
    state_shardings,
)


def _mesh(spec):
    return make_mesh(spec, mesh_devices(spec))


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_topk_equals_unsharded(spec):
    mesh = _mesh(spec)
    scores = jax.random.normal(jax.random.key(0), (16, 64))
    sharded = jax.device_put(scores, NamedSharding(mesh, P("data", "model")))
    for k in (1, 5, 20):
        got = jax.jit(lambda s: topk_mask(s, k, mesh))(sharded)
        np.testing.assert_array_equal(got, topk_mask(scores, k))
    got = jax.jit(lambda s: kth_largest(s, 37, mesh))(sharded)
    assert float(got) == float(kth_largest(scores, 37))


def test_sharding_plan_snapshot():
    mesh = _mesh("data:2,model:4")
    cfg = make_config(arch="jumprelu", width=64)
    _, sh = state_shardings(cfg, 16, make_optimizer(cfg), mesh)
    specs = {k: v.spec for k, v in sh.params.items()}
    assert specs == {"W_enc": P(None, "model"), "b_enc": P("model"), "W_dec": P("model", None),
                     "b_dec": P(None), "log_threshold": P("model")}
    adam = sh.opt_state[1][0]  # chain(clip, adam) -> adam -> ScaleByAdamState
    assert {k: v.spec for k, v in adam.mu.items()} == specs
    assert {k: v.spec for k, v in adam.nu.items()} == specs
    assert adam.count.spec == P() and sh.step.spec == P()
    assert sh.steps_since_fired.spec == P("model")


def _train_steps(cfg, rows, spec, n_steps):
    """`n_steps` of training on `rows`; a transcoder's rows are input then target halves."""
    mesh = _mesh(spec)
    tx = make_optimizer(cfg)
    d_in, d_out = (rows.shape[1] // 2,) * 2 if cfg.transcoder else (rows.shape[1], None)
    _, sh = state_shardings(cfg, d_in, tx, mesh, d_out)
    mean = rows[:, -(d_out or d_in):].mean(0)
    state = jax.jit(lambda k: init_state(k, cfg, d_in, mean, tx, d_out), out_shardings=sh)(
        jax.random.key(cfg.seed))
    step = compile_train_step(cfg, tx, mesh, sh, 1.0, 1.0 if cfg.transcoder else None)
    aux_losses = []
    for s in range(n_steps):
        x = jax.device_put(batch_at(rows, cfg, s), NamedSharding(mesh, P("data", None)))
        state, metrics = step(state, x)
        aux_losses.append(float(metrics["aux_loss"]))
    return jax.device_get(state.params), {**jax.device_get(metrics), "aux_max": max(aux_losses)}


@pytest.mark.parametrize("arch", list(saes.ARCHITECTURES))
def test_same_training_result_on_every_mesh(arch, synthetic):
    rows = synthetic[0][:4096]
    # dead_tokens=1 marks non-firing latents dead at once, so AuxK runs sharded too.
    # Crosscoders read the 32 columns as two sources of 16 (the summed-norm penalty); their
    # encode/decode code is the plain architectures', so two meshes suffice. CLTs read them
    # as two layers' inputs (8 each) then their two targets: a transcoder of 16 -> 16.
    crosscoder = saes.ARCHITECTURES[arch].crosscoder
    clt = arch.startswith("clt_")
    cfg = make_config(arch=arch, width=64, k=4, batch_size=64, steps=12, dead_tokens=1,
                      lr=1e-2, sparsity_coeff=0.5 if arch in ("relu", "jumprelu") else None,
                      sources=(8,) * 4 if clt else (16, 16) if crosscoder else None,
                      transcoder=clt or None)
    meshes = ["data:1,model:1", "data:2,model:4"] if crosscoder else MESHES
    results = {spec: _train_steps(cfg, rows, spec, 12) for spec in meshes}
    ref_params, ref_metrics = results[meshes[0]]
    if arch in ("topk", "batchtopk", "crosscoder_topk", "crosscoder_batchtopk", "clt_topk"):
        assert ref_metrics["aux_max"] > 0  # the dead-latent path really ran
    for spec, (params, metrics) in results.items():
        for name in ref_params:
            np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-4, atol=2e-5,
                                       err_msg=f"{arch} {name} on {spec}")
        assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-4)


def _param_bytes_per_device(spec, width=1024, d_in=64):
    cfg = make_config(arch="topk", width=width)
    shapes, sh = state_shardings(cfg, d_in, make_optimizer(cfg), _mesh(spec))
    total = 0
    for shape, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(sh)):
        total += int(np.prod(sharding.shard_shape(shape.shape))) * shape.dtype.itemsize
    return total


def test_state_bytes_per_device_shrink_with_model_axis():
    one, four, eight = (_param_bytes_per_device(s) for s in
                        ("data:8,model:1", "data:2,model:4", "data:1,model:8"))
    # params + Adam moments: 3 copies of 2·d·F weights dominate; biases b_dec are replicated
    assert four < one / 3.9 and eight < one / 7.7
