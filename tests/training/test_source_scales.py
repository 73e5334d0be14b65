"""Per-source input scales (`sae_jax.scales`): on a multi-source store each source gets its
own c_s with E‖c_s·x_s‖² = d_s, kept per column; a single-source store keeps one float."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax
from sae_jax import saes, scales
from sae_jax.analysis.evaluate import evaluate
from sae_jax.config import make_config
from sae_jax.data.importers import import_activations
from sae_jax.data.loader import scale_and_mean, stats_sample
from sae_jax.errors import UserError
from sae_jax.rundir import read_data_stats, read_run
from sae_jax.saelens import export_native, export_saelens
from sae_jax.training.train import train

D = 8


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same rows `[x | 10·x]` as a two-source store and as a plain one."""
    tmp = tmp_path_factory.mktemp("scales")
    x = np.random.default_rng(0).standard_normal((2048, D)).astype(np.float32)
    np.save(tmp / "a.npy", x)
    np.save(tmp / "b.npy", 10 * x)
    np.save(tmp / "ab.npy", np.concatenate([x, 10 * x], 1))
    return (import_activations([tmp / "a.npy", tmp / "b.npy"], tmp / "two"),
            import_activations(tmp / "ab.npy", tmp / "one"))


def test_sources_ten_times_larger_get_a_ten_times_smaller_scale(stores):
    two, one = stores
    per_source = read_data_stats(two.span(), 2 * D).input_scale
    assert scales.is_per_source(per_source) and len(per_source) == 2 * D
    assert len(set(per_source[:D])) == len(set(per_source[D:])) == 1
    assert per_source[0] / per_source[D] == pytest.approx(10, rel=1e-6)
    single = read_data_stats(one.span(), 2 * D).input_scale  # one float, exactly as before
    assert isinstance(single, float) and single == scale_and_mean(stats_sample(one.span()))[0]
    assert scales.split_widths([2, 3, 4, 5], 5, 9) == ([2, 3], [4, 5])  # a CLT's in/out
    assert scales.split_widths([2, 3, 4], 4, 5) == (None, None)  # no source boundary at d_in


def test_train_eval_export_and_load_with_per_source_scales(stores, tmp_path):
    two, _ = stores
    cfg = make_config(arch="crosscoder", width=32, batch_size=128, steps=20, lr=3e-3)
    train(cfg, two.path, tmp_path / "xc", progress=False, devices=jax.devices()[:1])
    saved = json.loads((tmp_path / "xc/config.json").read_text())["input_scale"]
    sae = sae_jax.load(tmp_path / "xc")
    assert isinstance(saved, list) and sae.input_scale == tuple(saved)
    x = np.asarray(two.rows[:64].read().result())
    want = saes.encode(sae.params, jnp.asarray(x) * np.asarray(saved, np.float32),
                       sae.config).f
    np.testing.assert_allclose(np.asarray(sae.encode(x)), np.asarray(want), rtol=1e-5,
                               atol=1e-6)
    assert evaluate(sae, two.split(cfg.holdout)[1])["fvu"] < 1.0
    export_native(tmp_path / "xc", tmp_path / "native")  # the scale as a (d_in,) tensor
    back = sae_jax.load(tmp_path / "native")
    assert back.input_scale == sae.input_scale
    np.testing.assert_array_equal(np.asarray(back.encode(x)), np.asarray(sae.encode(x)))

    relu = make_config(arch="relu", width=32, batch_size=128, steps=20, lr=3e-3)
    train(relu, two.path, tmp_path / "relu", progress=False, devices=jax.devices()[:1])
    export_saelens(tmp_path / "relu", tmp_path / "out")  # the scale folds in column by column
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "out/sae_weights.safetensors"))
    f = np.maximum((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0)
    np.testing.assert_allclose(f, np.asarray(sae_jax.load(tmp_path / "relu").encode(x)),
                               rtol=1e-4, atol=1e-4)

    config = json.loads((tmp_path / "xc/config.json").read_text())
    config["input_scale"] = saved[:-1]  # one value short: damaged, refused in one line
    (tmp_path / "xc/config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="input_scale lists 15 values for 16 columns"):
        read_run(tmp_path / "xc")
