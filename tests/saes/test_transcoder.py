"""Transcoders: input -> different target, optional skip connection; pair stores from harvest."""

import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sae_jax
from sae_jax.analysis.evaluate import evaluate
from sae_jax.config import make_config
from sae_jax.data.store import StoreWriter, open_store
from sae_jax.data.synthetic import atoms_recovered, sparse_transcoder_data
from sae_jax.errors import UserError
from sae_jax.mesh import make_mesh
from sae_jax.saelens import export_saelens
from sae_jax.training.step import (
    compile_train_step,
    init_state,
    make_optimizer,
    state_shardings,
)
from sae_jax.training.train import train
from tests.conftest import batch_at, json_result, mesh_devices, sae_jax_cli
from tests.test_export import read_export

D_IN, D_OUT, ATOMS = 32, 24, 64
IN_SCALE, OUT_SCALE = 37.0, 0.2  # raw units far from 1, so a wrong scale cannot pass


@pytest.fixture(scope="module")
def pairs():
    return sparse_transcoder_data(40_000, D_IN, D_OUT, ATOMS, seed=3)


@pytest.fixture(scope="module")
def pair_store(pairs, tmp_path_factory):
    x, y = pairs[0] * IN_SCALE, pairs[1] * OUT_SCALE
    path = tmp_path_factory.mktemp("pairs") / "store"
    with StoreWriter(path, d_in=D_IN + D_OUT,
                     meta={"pair": {"d_in": D_IN, "d_out": D_OUT}}) as w:
        w.append(np.concatenate([x, y], axis=1))
    return str(path)


@pytest.fixture(scope="module")
def trained(pair_store, tmp_path_factory):
    """skip -> run dir: topk transcoders with and without the skip connection."""
    runs = {}
    for skip in (False, True):
        runs[skip] = tmp_path_factory.mktemp("tc") / "run"
        cfg = make_config(arch="topk", width=128, k=4, steps=1500, batch_size=256, lr=3e-3,
                          skip_connection=skip)
        train(cfg, pair_store, runs[skip], progress=False, devices=jax.devices()[:1])
    return runs


def test_transcoder_learns_the_known_sparse_map(trained, pairs, pair_store):
    atoms_out = pairs[3]
    sae = sae_jax.load(trained[False])
    assert sae.transcoder and (sae.d_in, sae.d_out) == (D_IN, D_OUT)
    # The decoder holds the output atoms (the encoder reads the input through the atoms'
    # dual directions, which for 64 atoms in 32 dimensions are not the atoms themselves).
    assert atoms_recovered(np.asarray(sae.params["W_dec"]), atoms_out) >= 0.9
    result = evaluate(sae, open_store(pair_store).split(0.05)[1])
    assert result["fvu"] < 0.15  # FVU of the *target* (k=4 cannot cover rows with 5+ atoms)
    assert 3 < result["l0"] <= 4  # top-4, minus selections that are not positive


def test_prediction_is_in_target_units(trained, pairs):
    x, y = pairs[0][-512:] * IN_SCALE, pairs[1][-512:] * OUT_SCALE
    for run in trained.values():
        y_hat = np.asarray(sae_jax.load(run)(x))
        assert y_hat.shape == y.shape
        assert np.sum((y_hat - y) ** 2) / np.sum((y - y.mean(0)) ** 2) < 0.15


def test_skip_connection_is_learned(trained):
    W_skip = np.asarray(sae_jax.load(trained[True]).params["W_skip"])
    assert W_skip.shape == (D_OUT, D_IN) and np.abs(W_skip).max() > 1e-3
    assert "W_skip" not in sae_jax.load(trained[False]).params


@pytest.mark.parametrize("arch", ["topk", "matryoshka"])
def test_same_transcoder_training_on_1x1_and_2x4(arch, pairs):
    rows = np.concatenate([pairs[0][:4096], pairs[1][:4096]], axis=1)
    cfg = make_config(arch=arch, width=64, k=4, batch_size=64, steps=10, dead_tokens=1,
                      lr=1e-2, transcoder=True, skip_connection=True,
                      matryoshka_widths=(8, 32) if arch == "matryoshka" else None)
    results = []
    for spec in ("data:1,model:1", "data:2,model:4"):
        mesh = make_mesh(spec, mesh_devices(spec))
        tx = make_optimizer(cfg)
        _, sh = state_shardings(cfg, D_IN, tx, mesh, D_OUT)
        state = jax.jit(lambda k: init_state(k, cfg, D_IN, rows[:, D_IN:].mean(0), tx, D_OUT),
                        out_shardings=sh)(jax.random.key(0))
        step = compile_train_step(cfg, tx, mesh, sh, 1.0, 1.0)
        for s in range(10):
            state, metrics = step(state, jax.device_put(batch_at(rows, cfg, s),
                                                        NamedSharding(mesh, P("data", None))))
        results.append((jax.device_get(state.params), float(metrics["loss"])))
    (ref, ref_loss), (params, loss) = results
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    for name in ref:
        np.testing.assert_allclose(params[name], ref[name], rtol=1e-4, atol=2e-5, err_msg=name)


def test_resume_is_bitwise_and_export_matches_saelens_math(pair_store, pairs, tmp_path):
    cfg = dict(arch="batchtopk", width=64, k=4, batch_size=128, skip_connection=True,
               ckpt_every=10)
    devices = jax.devices()[:1]
    train(make_config(steps=20, **cfg), pair_store, tmp_path / "a", False, devices)
    # An interrupted run: the same directory with only the step-10 checkpoint left.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "20")
    train(make_config(steps=20, **cfg), pair_store, tmp_path / "b", False, devices)  # resumes
    a, b = sae_jax.load(tmp_path / "a"), sae_jax.load(tmp_path / "b")
    assert a.step == b.step == 20 and a.target_scale == b.target_scale
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)

    export_saelens(tmp_path / "a", tmp_path / "sl")
    scfg, t = read_export(tmp_path / "sl")
    assert scfg["architecture"] == "jumprelu_skip_transcoder"
    assert (scfg["d_in"], scfg["d_out"], scfg["apply_b_dec_to_input"]) == (D_IN, D_OUT, False)
    x = pairs[0][-256:] * IN_SCALE
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    h = x @ t["W_enc"] + t["b_enc"]  # SAELens's JumpReLUSkipTranscoder.forward, in numpy
    f = np.maximum(h, 0) * (h > t["threshold"])
    y_hat = f @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
    np.testing.assert_allclose(f, a.encode(x), rtol=1e-5, atol=1e-5 * np.abs(f).max())
    np.testing.assert_allclose(y_hat, a(x), rtol=1e-4, atol=1e-5 * np.abs(y_hat).max())


def test_topk_transcoder_export_is_refused(trained, tmp_path):
    with pytest.raises(UserError, match="no topk transcoder"):
        export_saelens(trained[False], tmp_path / "sl")


def test_transcoder_flag_must_match_the_store(pair_store, synthetic_store, tmp_path):
    with pytest.raises(UserError, match="needs a store of input/target pairs"):
        train(make_config(transcoder=True, steps=2, width=64, k=4), synthetic_store,
              tmp_path / "a", False)
    with pytest.raises(UserError, match="holds transcoder pairs"):
        train(make_config(transcoder=False, steps=2, width=64, k=4), pair_store,
              tmp_path / "b", False)
    with pytest.raises(UserError, match="skip_connection=true needs a transcoder"):
        make_config(transcoder=False, skip_connection=True)


def test_harvested_pairs_are_the_model_sublayer(params, tmp_path):
    """`harvest --pair block --layer 2` rows = [resid after layer 1, resid after layer 2]."""
    from sae_jax.lm.harvest import run_harvest

    kw = dict(max_tokens=300, seq_len=32, progress=False)
    meta = run_harvest(tmp_path / "pairs", layer=2, pair="block", **kw)
    assert meta["pair"] == {"d_in": 384, "d_out": 384, "site": "block"}
    run_harvest(tmp_path / "l1", layer=1, **kw)
    run_harvest(tmp_path / "l2", layer=2, **kw)
    rows = open_store(tmp_path / "pairs").span().read(0, 300)
    for cols, plain in ((slice(0, 384), "l1"), (slice(384, None), "l2")):
        ref = open_store(tmp_path / plain).span().read(0, 300)
        np.testing.assert_allclose(rows[:, cols], ref, atol=1e-5)


def test_mlp_transcoder_fidelity_splices_the_mlp_output(tmp_path):
    """A transcoder on MiniLM's MLP: the spliced pass replaces the MLP output, so adding back
    its error reproduces the clean embedding, and the prediction beats ablating the MLP."""
    from sae_jax.analysis.fidelity import downstream_fidelity
    from sae_jax.lm.harvest import run_harvest

    kw = dict(pair="mlp", max_tokens=6000, seq_len=64, progress=False)
    run_harvest(tmp_path / "pairs", layer=3, **kw)
    cfg = make_config(width=256, k=16, steps=150, batch_size=128, holdout=0.2)
    train(cfg, tmp_path / "pairs", tmp_path / "run", False, jax.devices()[:1])
    sae = sae_jax.load(tmp_path / "run")
    out = downstream_fidelity(sae, open_store(tmp_path / "pairs"), n_sequences=8)
    assert out["cos_spliced_with_error"] == pytest.approx(1.0, abs=1e-6)
    assert out["cos_spliced"] > out["cos_zero_ablation"]
    assert 0 < out["fvu_spliced"] < 1


def test_clt_eval_replaces_both_mlps_through_the_entry_point(tmp_path):
    """A cross-layer transcoder on the MLPs of blocks 2 and 3 (`saes.clt`), evaluated through
    `sae-jax eval`: both MLP outputs replaced at once, block 3's predicted from the MLP input
    of the patched pass."""
    from sae_jax.lm.harvest import run_harvest

    run_harvest(tmp_path / "clt", pair="mlp", layers=[2, 3], max_tokens=2000, seq_len=32,
                progress=False)
    cfg = make_config(arch="clt_topk", width=128, k=8, steps=60, batch_size=128, holdout=0.2)
    train(cfg, tmp_path / "clt", tmp_path / "clt_run", False, jax.devices()[:1])
    r = json_result(sae_jax_cli("eval", tmp_path / "clt_run", tmp_path / "clt",
                                "--fidelity-sequences", 8, "--no-baselines"))
    fidelity = r["fidelity"]
    assert fidelity["layer"] == [2, 3] and len(r["fvu_per_block"]) == 2
    assert fidelity["cos_spliced_with_error"] == pytest.approx(1.0, abs=1e-6)
    assert fidelity["cos_spliced"] > fidelity["cos_zero_ablation"]
    assert 0 < fidelity["fvu_spliced"] < 1
