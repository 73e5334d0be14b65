"""Downstream fidelity on a tiny MiniLM harvest: the error-term splice is the clean run, an
exact SAE recovers everything, ablations lose, a trained SAE lies in between."""

import numpy as np
import pytest

from sae_jax.analysis.fidelity import downstream_fidelity  # noqa: E402
from sae_jax.config import make_config  # noqa: E402
from sae_jax.data.store import open_store  # noqa: E402
from sae_jax.errors import UserError  # noqa: E402
from sae_jax.lm.harvest import run_harvest  # noqa: E402
from sae_jax.lm.hooks import NOT_MODEL_BACKED  # noqa: E402
from sae_jax.sae import SAE, load  # noqa: E402
from sae_jax.training.train import train  # noqa: E402

N_SEQ = 12


@pytest.fixture(scope="module")
def harvested(tmp_path_factory, params):  # `params` loads MiniLM once for the session
    tmp = tmp_path_factory.mktemp("fidelity")
    run_harvest(tmp / "store", layer=3, max_tokens=3000, seq_len=32, progress=False)
    import jax

    cfg = make_config(arch="topk", width=64, k=4, steps=30, batch_size=128)
    train(cfg, tmp / "store", tmp / "run", progress=False, devices=jax.devices()[:1])
    return open_store(tmp / "store"), load(tmp / "run")


@pytest.fixture(scope="module")
def trained_result(harvested):
    store, sae = harvested
    return downstream_fidelity(sae, store, n_sequences=N_SEQ, seed=0)


def exact_sae(d: int, holdout: float) -> SAE:
    """ReLU features (+e_i, -e_i): reconstruction relu(x) - relu(-x) = x exactly."""
    eye = np.eye(d, dtype=np.float32)
    p = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d, np.float32),
         "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d, np.float32)}
    return SAE(make_config(arch="relu", width=2 * d, holdout=holdout, compute_dtype="float32"),
               p, 1.0, 0)


def test_error_term_splice_is_clean_and_ablations_lose(trained_result):
    r = trained_result
    assert r["n_sequences"] == N_SEQ and r["n_tokens_spliced"] > 0 and r["layer"] == 3
    assert r["cos_clean"] == pytest.approx(1.0, abs=1e-9)
    assert r["cos_min_spliced_with_error"] > 1 - 1e-5
    assert r["cos_zero_ablation"] < 0.999 and r["cos_mean_ablation"] < 0.999
    # The tiny SAE (30 steps) is better than ablating, worse than exact.
    assert r["loss_spliced"] > 1e-5
    assert 0 < r["fidelity_recovered"] < 1 and 0 < r["fidelity_recovered_zero"] < 1
    assert r["loss_mean_ablation"] > r["loss_spliced"]
    assert 0 < r["fvu_spliced"] < 1


def test_exact_sae_recovers_everything(harvested):
    store, sae = harvested
    r = downstream_fidelity(exact_sae(store.d_in, sae.config.holdout), store,
                            n_sequences=N_SEQ, seed=0)
    assert r["fvu_spliced"] == 0.0
    assert r["cos_spliced"] > 1 - 1e-6
    assert r["fidelity_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert r["fidelity_recovered_zero"] == pytest.approx(1.0, abs=1e-4)


def test_others_spliced_in_the_same_calls_score_as_their_own_runs(harvested, trained_result):
    """An SAE passed as one of `others` (the random baselines' way) gets the numbers its own
    run gives: the trained SAE scores as itself, the exact SAE recovers everything."""
    store, sae = harvested
    r = downstream_fidelity(sae, store, n_sequences=N_SEQ, seed=0,
                            others={"self": sae, "exact": exact_sae(store.d_in,
                                                                    sae.config.holdout)})
    assert r["fidelity_recovered"] == pytest.approx(trained_result["fidelity_recovered"],
                                                    abs=1e-6)
    own = r.pop("others")
    assert own["self"]["fidelity_recovered"] == pytest.approx(r["fidelity_recovered"], abs=1e-6)
    assert own["self"]["loss_spliced"] == pytest.approx(r["loss_spliced"], abs=1e-7)
    assert own["exact"]["fidelity_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert own["exact"]["fidelity_recovered_zero"] == pytest.approx(1.0, abs=1e-4)


def test_deterministic(harvested, trained_result):
    store, sae = harvested
    assert downstream_fidelity(sae, store, n_sequences=N_SEQ, seed=0) == trained_result
    other = downstream_fidelity(sae, store, n_sequences=N_SEQ, seed=1)
    assert other != trained_result  # another sample of sequences


def test_not_model_backed(synthetic_store, harvested):
    _, sae = harvested
    with pytest.raises(UserError, match=NOT_MODEL_BACKED):
        downstream_fidelity(sae, open_store(synthetic_store))
