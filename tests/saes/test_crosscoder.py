"""Crosscoders: one dictionary over several aligned sources, one decoder block per source,
the penalty weighted by the sum of per-source decoder norms (`saes.crosscoder`)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax
from sae_jax import saes
from sae_jax.analysis.diff import classify, relative_norms, source_blocks
from sae_jax.analysis.evaluate import evaluate
from sae_jax.config import config_from_dict, make_config
from sae_jax.data.importers import import_activations
from sae_jax.data.synthetic import two_source_data
from sae_jax.errors import UserError
from sae_jax.rundir import data_widths
from sae_jax.saelens import export_saelens
from sae_jax.saes.common import Code, penalty_norms
from sae_jax.saes.penalties import l1
from sae_jax.training.train import train

D = 16  # width of each source


@pytest.fixture(scope="module")
def planted():
    """Two sources of width 16: 16 shared atoms, 8 only in A, 8 only in B."""
    return two_source_data(20_000, D, n_shared=16, n_exclusive=8, active=3.0, seed=0)


@pytest.fixture(scope="module")
def store(planted, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xc")
    np.save(tmp / "base.npy", planted[0][:, :D])
    np.save(tmp / "chat.npy", planted[0][:, D:])
    return import_activations([tmp / "base.npy", tmp / "chat.npy"], tmp / "store")


def test_penalty_weighs_activations_by_summed_source_norms():
    cfg = make_config(arch="crosscoder", sources=(2, 3))
    W_dec = jnp.array([[3.0, 4.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 2.0, 1.0]])
    params = {"W_dec": W_dec}
    np.testing.assert_allclose(penalty_norms(params, cfg), [5.0, 1.0 + 3.0])
    l2 = make_config(arch="crosscoder", sources=(2, 3), crosscoder_norm="l2")
    np.testing.assert_allclose(penalty_norms(params, l2), np.linalg.norm(W_dec, axis=1))
    code = Code(jnp.zeros((1, 2)), jnp.array([[2.0, 0.5]]), {})
    np.testing.assert_allclose(l1(params, code, cfg), [2.0 * 5.0 + 0.5 * 4.0])
    # a source block at exactly zero (an exclusive latent) has a finite gradient
    grad = jax.grad(lambda W: l1({"W_dec": W}, code, cfg).sum())(W_dec)
    assert np.isfinite(np.asarray(grad)).all()


def test_sources_reach_the_architecture_from_the_store(store):
    cfg, d_in, d_out = data_widths(make_config(arch="crosscoder_topk", k=4, width=32), store)
    assert cfg.sources == (D, D) and d_in == 2 * D and d_out is None
    with pytest.raises(UserError, match=r"sources=8,24 disagrees with store .*16,16"):
        data_widths(make_config(arch="crosscoder", sources=(8, 24)), store)
    with pytest.raises(UserError, match="sources is for the crosscoder and CLT architectures"):
        make_config(arch="relu", sources=(16, 16))
    with pytest.raises(UserError, match=r"add up to 10, but the rows have width 32"):
        saes.init(jax.random.key(0), make_config(arch="crosscoder", sources=(4, 6)), 2 * D)
    with pytest.raises(UserError, match="not transcoder pairs"):
        make_config(arch="crosscoder", transcoder=True)
    # a run saved before these keys existed still loads, with the plain behaviour
    old = {k: v for k, v in make_config().to_dict().items()
           if k not in ("sources", "crosscoder_norm")}
    assert config_from_dict(old) == make_config()


def test_planted_shared_and_exclusive_atoms_are_classified(planted, store, tmp_path):
    """Every latent that learned a planted atom (decoder cosine ≥ 0.9) is classed by its
    relative decoder norm as that atom is: shared, A-only or B-only."""
    _, atoms, kinds = planted
    cfg = make_config(arch="crosscoder", width=64, batch_size=256, steps=600, lr=3e-3)
    train(cfg, store.path, tmp_path / "run", progress=False, devices=jax.devices()[:1])
    W_dec = np.asarray(sae_jax.load(tmp_path / "run").params["W_dec"])
    classes = classify(relative_norms(*source_blocks(W_dec, (D, D), 0, 1)))
    cos = (W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)) @ atoms.T
    learned = np.flatnonzero(cos.max(1) >= 0.9)
    correct = [classes[i] == kinds[cos[i].argmax()] for i in learned]
    assert len(learned) >= len(atoms)  # every atom has (at least) one latent
    assert np.mean(correct) >= 0.9, (np.mean(correct), len(learned))
    assert (cos.max(0) >= 0.9).mean() >= 0.9  # and the atoms are recovered
    sae = sae_jax.load(tmp_path / "run")  # eval and decode need nothing crosscoder-specific
    _, heldout = store.split(cfg.holdout)
    assert evaluate(sae, heldout)["fvu"] < 0.3
    with pytest.raises(UserError, match="no SAELens export for arch=crosscoder"):
        export_saelens(tmp_path / "run", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_resume_is_bitwise_identical(store, tmp_path):
    """A run resumed from a middle checkpoint ends bitwise equal to the uninterrupted one
    (BatchTopK: its threshold buffer and the dead-latent counters are restored too)."""
    cfg = make_config(arch="crosscoder_batchtopk", width=64, k=4, batch_size=128, steps=30,
                      ckpt_every=10, keep_checkpoints=5, mesh="data:2,model:4")
    train(cfg, store.path, tmp_path / "whole", progress=False)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed/checkpoints/30")  # as if killed after step 20's save
    assert sae_jax.load(tmp_path / "resumed").step == 20
    train(cfg, store.path, tmp_path / "resumed", progress=False)
    whole, resumed = sae_jax.load(tmp_path / "whole"), sae_jax.load(tmp_path / "resumed")
    assert resumed.step == 30 and "threshold" in whole.params
    for name, value in whole.params.items():
        np.testing.assert_array_equal(np.asarray(resumed.params[name]), np.asarray(value),
                                      err_msg=name)
