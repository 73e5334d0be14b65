"""AuxK revives dead latents (Gao et al. 2024, sec. 2.4) on data where they die.

Half of a TopK dictionary starts on the frequent atoms of the data; the other half starts on
random directions in the span of rare atoms, with half-norm encoders. Every row holds three
frequent atoms and one rare one, all with coefficients in [2, 3], so with k = 3 the frequent
latents (pre-activation ≥ 2) beat the others (≤ 1.5) in every row: the other half is never
selected, gets no gradient from the main loss and stays dead for good. AuxK trains the top
dead latents to reconstruct what the live ones leave (the rare atom), which turns them
towards the rare atoms until they win slots and fire again.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.config import make_config
from sae_jax.saes import topk
from sae_jax.training.step import TrainState, make_optimizer, make_train_step

D, HALF, BATCH, STEPS = 32, 16, 256, 500


def _rows(rng, n):
    """Rows with 3 of the frequent atoms e_0..e_15 and 1 of the rare e_16..e_31."""
    x = np.zeros((n, D), np.float32)
    for i in range(n):
        frequent = rng.choice(HALF, 3, replace=False)
        x[i, frequent] = rng.uniform(2.0, 3.0, 3)
        x[i, HALF + rng.integers(HALF)] = rng.uniform(2.0, 3.0)
    return x


def _initial_params(rng):
    random = rng.standard_normal((HALF, HALF))
    w_dec = np.zeros((2 * HALF, D), np.float32)
    w_dec[:HALF, :HALF] = np.eye(HALF)  # live: exactly the frequent atoms
    w_dec[HALF:, HALF:] = random / np.linalg.norm(random, axis=1, keepdims=True)
    w_enc = w_dec.T.copy()
    w_enc[:, HALF:] *= 0.5
    return {"W_enc": jnp.asarray(w_enc), "b_enc": jnp.zeros(2 * HALF),
            "W_dec": jnp.asarray(w_dec), "b_dec": jnp.zeros(D)}


def _train(aux_coeff):
    rng = np.random.default_rng(0)
    cfg = make_config(arch="topk", width=2 * HALF, k=3, aux_k=8, aux_coeff=aux_coeff,
                      dead_tokens=5 * BATCH, batch_size=BATCH, steps=STEPS, lr=3e-3,
                      lr_decay=0.0)
    tx = make_optimizer(cfg)
    params = _initial_params(rng)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params),
                       steps_since_fired=jnp.zeros((cfg.width,), jnp.int32))
    step = jax.jit(make_train_step(cfg, tx, None, 1.0))
    for _ in range(STEPS):
        state, metrics = step(state, jnp.asarray(_rows(rng, BATCH)))
    test = jnp.asarray(_rows(np.random.default_rng(1), 2048))
    fires = np.asarray((topk.encode(state.params, test, cfg).f > 0).mean(0))
    w = np.asarray(state.params["W_dec"])
    return fires, np.abs(w[HALF:, HALF:]).max(1), float(metrics["dead_frac"])


@pytest.fixture(scope="module")
def without_auxk():
    return _train(0.0)


@pytest.fixture(scope="module")
def with_auxk():
    return _train(1 / 32)


def test_without_auxk_the_starved_half_stays_dead(without_auxk):
    fires, _, dead_frac = without_auxk
    assert fires[:HALF].min() > 0.05  # the frequent latents live
    assert fires[HALF:].max() == 0.0  # the others never fire, so nothing moves them
    assert dead_frac == pytest.approx(0.5)


def test_auxk_revives_them_onto_the_rare_atoms(without_auxk, with_auxk):
    fires, best_cos, dead_frac = with_auxk
    assert fires[:HALF].min() > 0.05
    revived = fires[HALF:] > 0.005
    assert revived.mean() >= 0.5, fires[HALF:]
    assert dead_frac < 0.25
    # they revive by turning towards the rare atoms, not by firing at random
    assert best_cos[revived].min() > 0.9
    assert np.median(without_auxk[1]) < 0.7  # random directions in 16 dimensions
