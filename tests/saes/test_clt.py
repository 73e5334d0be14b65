"""Cross-layer transcoders: latents of layer l read layer l's MLP input and write to the MLP
outputs of layers l..L−1 (`saes.clt`)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax
from sae_jax import saes
from sae_jax.analysis.baselines import random_directions_sae
from sae_jax.analysis.evaluate import evaluate
from sae_jax.analysis.splice import CrossLayerSplice
from sae_jax.config import make_config
from sae_jax.data.store import StoreWriter, open_store
from sae_jax.data.synthetic import cross_layer_data
from sae_jax.errors import UserError
from sae_jax.mesh import make_mesh
from sae_jax.rundir import data_widths
from sae_jax.sae import SAE
from sae_jax.training.step import check_mesh_fits
from sae_jax.training.train import train

L, D, ATOMS = 3, 12, 8  # layers, width of each block, planted atoms per layer


def clt_meta(layers: list, d: int, model: str | None = None) -> dict:
    """The CLT store schema (`harvest --pair mlp --layers ...`): pair, layers, 2L sources."""
    sources = [{"name": f"{site}.{layer}", "d": d, "model": model, "hash": None,
                "layer": layer, "site": site}
               for site in ("mlp_in", "mlp_out") for layer in layers]
    n = len(layers) * d
    return {"pair": {"d_in": n, "d_out": n, "site": "mlp"}, "layers": list(layers),
            "sources": sources}


@pytest.fixture(scope="module")
def planted():
    return cross_layer_data(20_000, D, L, ATOMS, active=2.0, seed=0)


@pytest.fixture(scope="module")
def store(planted, tmp_path_factory):
    path = tmp_path_factory.mktemp("clt") / "store"
    with StoreWriter(path, d_in=2 * L * D, meta=clt_meta(list(range(L)), D)) as w:
        w.append(planted[0])
    return open_store(path)


def _causal_zeros(W_dec: np.ndarray) -> np.ndarray:
    """The entries a CLT may never write: latent i (layer i mod L) into target blocks < it."""
    layer_of = np.arange(W_dec.shape[0]) % L
    target_of = np.arange(W_dec.shape[1]) // D
    return W_dec[layer_of[:, None] > target_of[None, :]]


def test_layers_come_from_the_store_and_bad_configs_are_one_line(store):
    cfg, d_in, d_out = data_widths(make_config(arch="clt_topk", width=48, k=2), store)
    assert cfg.transcoder and cfg.sources == (D,) * 2 * L and d_in == d_out == L * D
    with pytest.raises(UserError, match="width=50 must divide by the CLT's 3 layers"):
        data_widths(make_config(arch="clt_topk", width=50, k=2), store)
    with pytest.raises(UserError, match=r"k=20 \(per layer\) must be <= width/layers = 16"):
        data_widths(make_config(arch="clt_topk", width=48, k=20), store)
    with pytest.raises(UserError, match="trains on a store of MLP input/output pairs"):
        make_config(arch="clt_jumprelu", transcoder=False)
    with pytest.raises(UserError, match="L input blocks then L target blocks"):
        make_config(arch="clt_topk", sources=(4, 4, 4))


def test_causal_mask_is_exact_in_init_and_gradient():
    cfg = make_config(arch="clt_jumprelu", width=48, sources=(D,) * 2 * L, transcoder=True)
    params = jax.jit(lambda key: saes.init(key, cfg, L * D, None, L * D))(jax.random.key(0))
    assert params["W_enc"].shape == (L * D, 48 // L)  # no block-diagonal (L·d, F)
    assert (_causal_zeros(np.asarray(params["W_dec"])) == 0).all()
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-6)
    x, y = np.random.default_rng(0).standard_normal((2, 16, L * D), np.float32)
    grads = jax.jit(jax.grad(lambda p: saes.loss(p, x, cfg, target=y)[0]))(params)
    assert (_causal_zeros(np.asarray(grads["W_dec"])) == 0).all()
    # the layer-l latents read input block l only
    bumped = x + (np.arange(L * D) >= D)  # change the inputs of layers 1 and 2
    encode = jax.jit(lambda v: saes.encode(params, v, cfg).pre)
    pre, pre_bumped = np.asarray(encode(x)), np.asarray(encode(bumped))
    np.testing.assert_array_equal(pre[:, 0::L], pre_bumped[:, 0::L])
    assert not np.allclose(pre[:, 1::L], pre_bumped[:, 1::L])
    # the spliced pass's layer-by-layer prediction is the CLT's own on the same inputs
    sae = SAE(cfg, params, 2.0, 0, 0.5)

    def layer_by_layer(x):
        splice = CrossLayerSplice(sae)
        return jnp.concatenate([splice(p, x[:, p * D:(p + 1) * D]) for p in range(L)], 1)

    np.testing.assert_allclose(jax.jit(layer_by_layer)(x), jax.jit(sae.reconstruct_raw)(x),
                               rtol=1e-5, atol=1e-5)
    # eval's random-directions baseline of a CLT is a fresh clt_topk, causal too
    baseline = random_directions_sae(sae, l0=7.0)
    assert baseline.config.arch == "clt_topk" and baseline.config.k == 2
    assert (_causal_zeros(np.asarray(baseline.params["W_dec"])) == 0).all()


@pytest.mark.parametrize("arch", ["clt_topk", "clt_jumprelu"])
def test_recovers_the_planted_multi_layer_map(arch, planted, store, tmp_path):
    """Every planted atom (its decoder over the target layers) has a latent of its own layer
    at cosine ≥ 0.9 (measured 100 % for both), and the causal blocks stay exactly zero."""
    _, decoders, layer_of = planted
    cfg = make_config(arch=arch, width=48, k=2, batch_size=256, steps=400, lr=5e-3)
    train(cfg, store.path, tmp_path / "run", progress=False, devices=jax.devices()[:1])
    sae = sae_jax.load(tmp_path / "run")
    W_dec = np.asarray(sae.params["W_dec"])
    assert (_causal_zeros(W_dec) == 0).all()
    cos = decoders @ (W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)).T
    assert (cos.max(1) >= 0.9).mean() >= 0.9, np.round(cos.max(1), 2)
    assert (cos.argmax(1) % L == layer_of).mean() >= 0.9
    result = evaluate(sae, store.split(cfg.holdout)[1])
    blocks = result["fvu_per_block"]  # one per target layer; the total is their weighted mean
    assert len(blocks) == L and min(blocks) <= result["fvu"] <= max(blocks) < 0.5, blocks


def test_resume_is_bitwise_identical_on_a_sharded_mesh(store, tmp_path):
    """Killed after step 3's save and rerun on data:2,model:4 (AuxK on: dead_tokens=1): the
    same params, bit for bit, as the uninterrupted run."""
    cfg = make_config(arch="clt_topk", width=24, k=2, batch_size=64, steps=6, ckpt_every=3,
                      keep_checkpoints=5, mesh="data:2,model:4", dead_tokens=1)
    bad = data_widths(make_config(arch="clt_topk", width=48, k=2), store)[0]
    with pytest.raises(UserError, match=r"width/layers = 16 .* model axis \(6 devices\)"):
        check_mesh_fits(bad, make_mesh("data:1,model:6", jax.devices()[:6]))
    train(cfg, store.path, tmp_path / "whole", progress=False)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed/checkpoints/6")
    train(cfg, store.path, tmp_path / "resumed", progress=False)
    whole, resumed = sae_jax.load(tmp_path / "whole"), sae_jax.load(tmp_path / "resumed")
    assert resumed.step == 6
    for name, value in whole.params.items():
        np.testing.assert_array_equal(np.asarray(resumed.params[name]), np.asarray(value),
                                      err_msg=name)
    assert (_causal_zeros(np.asarray(whole.params["W_dec"])) == 0).all()
