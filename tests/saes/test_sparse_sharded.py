"""The sparse TopK, BatchTopK and Matryoshka paths (`saes.sparse`, `saes.batch_sparse`)
against the dense reference (`sparse.disabled()`) on one device, through 3 train steps with
AuxK on every one (latents forced dead from the start), on meshes (1,8), (2,4) and (8,1)
(BatchTopK on (2,4) only: Matryoshka is BatchTopK's selection, threshold and AuxK plus its
prefix losses, so it covers the other two meshes; a budget for the suite's time).
AuxK gathers its rows on (2,4) and (8,1) and takes the masked dense decode on (1,8)
(`sparse.gather_pays`: 2·12 > 128/8). Tolerances, relative to each param's largest entry:
f32, 99.5 % of entries within 1e-5 and all within 1e-3 (Adam divides by √v + 1e-8, so a
gradient near 1e-8 whose rounding differs moves its entry by a visible fraction of lr; the
step losses and L0 agree within 1e-4); bf16 (TopK on (2,4)), 99 % within 2e-2 and all
within 2·lr per step (a rounding-level gradient whose sign differs moves its entry by up to
2·lr).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import saes
from sae_jax.config import make_config
from sae_jax.mesh import batch_sharding, make_mesh
from sae_jax.saes import sparse
from sae_jax.training.step import init_state, make_optimizer, make_train_step, state_shardings

D_IN, WIDTH, BATCH, STEPS, AUX_K = 12, 128, 16, 3, 2
DEAD = np.arange(WIDTH) % 3 == 0  # spread over every shard of every mesh


@functools.cache
def _cfg(arch, compute_dtype):
    return make_config(arch=arch, width=WIDTH, k=4, aux_k=AUX_K, aux_coeff=0.5, lr=1e-3,
                       batch_size=BATCH, steps=100, dead_tokens=BATCH * 50,
                       compute_dtype=compute_dtype,
                       matryoshka_widths=(16, 48) if arch == "matryoshka" else None)


def _batches():
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.normal(size=(BATCH, D_IN)) + 0.3, jnp.float32) for _ in range(STEPS)]


def _train(cfg, mesh_spec):
    """Params and metrics after STEPS steps from a state whose DEAD latents are already dead,
    on `mesh_spec` (None: one device)."""
    tx = make_optimizer(cfg)
    state = init_state(jax.random.key(0), cfg, D_IN, None, tx)
    state = state.replace(steps_since_fired=jnp.where(DEAD, 10**6, 0).astype(jnp.int32))
    mesh = make_mesh(mesh_spec) if mesh_spec else None
    step = make_train_step(cfg, tx, mesh, input_scale=1.0)
    if mesh is None:
        step = jax.jit(step)
    else:
        _, sh = state_shardings(cfg, D_IN, tx, mesh)
        state = jax.device_put(state, sh)
        step = jax.jit(step, in_shardings=(sh, batch_sharding(mesh)))
    aux = []
    for x in _batches():
        state, metrics = step(state, x)
        aux.append([float(metrics[k]) for k in ("aux_loss", "mse", "l0")])
    return jax.device_get(state.params), np.array(aux)


@functools.cache
def _dense_reference(arch, compute_dtype):
    with sparse.disabled():
        return _train(_cfg(arch, compute_dtype), None)


MESHES = ["data:1,model:8", "data:2,model:4", "data:8,model:1"]


@pytest.mark.parametrize("arch,mesh_spec,compute_dtype", [
    *(("topk", m, "float32") for m in MESHES), ("topk", "data:2,model:4", "bfloat16"),
    ("batchtopk", "data:2,model:4", "float32"),  # Matryoshka below runs its selection too
    *(("matryoshka", m, "float32") for m in MESHES)])
def test_sparse_train_steps_equal_dense_on_every_mesh(arch, mesh_spec, compute_dtype):
    mesh = make_mesh(mesh_spec)
    cfg = _cfg(arch, compute_dtype)
    assert sparse.usable(mesh)
    assert sparse.gather_pays(AUX_K, D_IN, WIDTH, mesh) == (mesh_spec != "data:1,model:8")
    x = _batches()[0]
    assert saes.get(cfg).train_encode(_train_start(), x, cfg, mesh).idx is not None
    want, want_aux = _dense_reference(arch, compute_dtype)
    got, got_aux = _train(cfg, mesh_spec)
    assert want_aux[:, 0].min() > 0  # every step took the AuxK branch
    tol = 1e-5 if compute_dtype == "float32" else 2e-2
    np.testing.assert_allclose(got_aux, want_aux, rtol=10 * tol)  # aux loss, mse, l0
    for name in saes.param_axes(cfg):
        error = np.abs(got[name] - want[name]) / float(np.abs(want[name]).max())
        if compute_dtype == "float32":
            assert np.mean(error > tol) <= 0.005 and error.max() <= 100 * tol, name
        else:
            assert np.mean(error > tol) <= 0.01, name
            assert np.abs(got[name] - want[name]).max() <= 2 * cfg.lr * STEPS
    moved = np.abs(got["W_enc"] - _train_start()["W_enc"]).max(0)
    assert (moved[DEAD] > 0).mean() > 0.5  # AuxK reached the dead latents' encoder columns


@functools.cache
def _train_start():
    cfg = _cfg("topk", "float32")
    return jax.device_get(init_state(jax.random.key(0), cfg, D_IN, None,
                                     make_optimizer(cfg)).params)


def test_sharded_top_k_ties_and_communication():
    """Ties go to the lowest global id, as `lax.top_k` does; the compiled selection gathers
    only the k-per-shard candidates, never the (batch, F) scores."""
    mesh = make_mesh("data:2,model:4")
    scores = jnp.tile(jnp.repeat(jnp.arange(8.0), 8)[::-1], (4, 1))  # runs of 8 equal values
    f = jax.jit(lambda s: sparse.topk_indices(s, 11, mesh))
    np.testing.assert_array_equal(f(scores), jax.lax.top_k(scores, 11)[1])
    hlo = f.lower(scores).compile().as_text()
    gathers = [ln for ln in hlo.splitlines() if "all-gather" in ln and "=" in ln]
    assert gathers and not any(",64]" in ln for ln in gathers), gathers  # F = 64 never moves
