"""Random baselines: what an SAE scores without having learned anything, so a trained SAE's
numbers can be read as a margin over chance (trained SAEs can barely beat random ones on
some metrics, arXiv 2602.14111).

* `random_directions_sae`: TopK of the trained SAE's width with k = its L0, decoder rows
  random unit directions and the encoder their transpose: each row is reconstructed from
  its k largest projections onto random directions. The trained `b_dec` is kept: the data's
  centre is not a feature, so the margin measures the features alone. A transcoder's
  encoder gets its own random directions (its input and target spaces differ) and no skip
  path. A cross-layer transcoder's is a `clt_topk` of fresh random directions (k = its L0
  per layer), so that it splices layer by layer as the CLT does.
* `random_init_sae`: the architecture's own fresh init (`saes.init`) at the same config and
  input scale, centred at the trained `b_dec` (training centres it at the data mean). A
  fresh BatchTopK / Matryoshka has no inference threshold yet (training estimates it from
  its first batch); it gets the one at which a unit-variance Gaussian pre-activation fires
  on k of F latents (`fresh_threshold`), i.e. L0 ≈ k on isotropic data in the scaled units
  where E‖x‖² = d_in.
* `random_weights_sae`: the trained SAE with every encoder column and decoder row replaced
  by a random direction of the same norm, biases and thresholds kept: the audit's control
  (same norms and firing thresholds, so its features fire about as often, on random
  projections).

`margins` signs every difference so that positive means the trained SAE is better.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import saes
from sae_jax.analysis.core_metrics import HIGHER_IS_BETTER, eval_sums, row_metrics
from sae_jax.analysis.downstream import recovered
from sae_jax.sae import SAE
from sae_jax.saes import clt
from sae_jax.vectors import unit_vectors

SCORED = ("fvu", "explained_variance", "mse", "l0")
"""What eval reports of each baseline besides the downstream number."""


def unit_gaussian(rng: np.random.Generator, shape: tuple[int, int], axis: int) -> np.ndarray:
    """Independent uniformly random unit vectors along `axis`, float32."""
    return unit_vectors(rng.standard_normal(shape), axis=axis).astype(np.float32)


def random_directions_sae(sae: SAE, l0: float, seed: int = 0) -> SAE:
    """TopK with k = round(l0) (1 … width) over random unit decoder directions, encoder
    their transpose (module docstring)."""
    if clt.is_clt(sae.config):
        return _random_directions_clt(sae, l0, seed)
    rng = np.random.default_rng(seed)
    k = min(max(1, round(l0)), sae.width)
    w_dec = unit_gaussian(rng, (sae.width, sae.d_out), axis=1)
    w_enc = unit_gaussian(rng, (sae.d_in, sae.width), axis=0) if sae.transcoder else w_dec.T
    cfg = dataclasses.replace(sae.config, arch="topk", k=k, penalty="none", sparsity_coeff=0.0,
                              skip_connection=False, matryoshka_widths=None)
    params = {"W_enc": jnp.asarray(w_enc), "b_enc": jnp.zeros((sae.width,), jnp.float32),
              "W_dec": jnp.asarray(w_dec), "b_dec": jnp.asarray(sae.params["b_dec"])}
    return SAE(cfg, params, sae.input_scale, 0, sae.target_scale)


def _random_directions_clt(sae: SAE, l0: float, seed: int) -> SAE:
    """A CLT's random-directions baseline is a `clt_topk` of the same layers (k = l0 / L per
    layer) at its fresh init: random unit encoder directions per layer, random causal unit
    decoders, the trained `b_dec`; a plain TopK could not be spliced layer by layer."""
    layers = clt.n_layers(sae.config)
    k = min(max(1, round(l0 / layers)), sae.width // layers)
    cfg = dataclasses.replace(sae.config, arch="clt_topk", k=k, penalty="none",
                              sparsity_coeff=0.0)
    params = saes.init(jax.random.key(seed), cfg, sae.d_in, sae.params["b_dec"], sae.d_out)
    return SAE(cfg, params, sae.input_scale, 0, sae.target_scale)


def fresh_threshold(k: int, width: int) -> float:
    """The threshold a unit-variance Gaussian pre-activation passes with probability k/width
    (0 from k ≥ width/2 on: the ReLU already halves the firing)."""
    return max(0.0, NormalDist().inv_cdf(1.0 - min(k, width) / width)) if k < width else 0.0


def random_init_sae(sae: SAE, seed: int = 0) -> SAE:
    """The architecture's fresh init at the trained SAE's config and scale (module
    docstring)."""
    cfg = sae.config
    params = saes.init(jax.random.key(seed), cfg, sae.d_in, sae.params["b_dec"], sae.d_out)
    if "threshold" in params:  # BatchTopK / Matryoshka: not estimated yet
        params["threshold"] = jnp.float32(fresh_threshold(cfg.k, sae.width))
    return SAE(cfg, params, sae.input_scale, 0, sae.target_scale)


def random_weights_sae(sae: SAE, seed: int = 0) -> SAE:
    """`sae` with each encoder column and decoder row replaced by an independent Gaussian
    direction of the same norm (biases and thresholds kept), so its features fire on random
    projections and write random directions: the audit's control."""
    rng = np.random.default_rng(seed)
    params = dict(sae.params)
    for name, axis in (("W_enc", 0), ("W_dec", 1)):
        w = np.asarray(params[name], np.float32)
        r = rng.standard_normal(w.shape)
        r *= np.linalg.norm(w, axis=axis, keepdims=True) / np.linalg.norm(r, axis=axis,
                                                                           keepdims=True)
        params[name] = jnp.asarray(r, jnp.float32)
    return dataclasses.replace(sae, params=params)


def baseline_saes(sae: SAE, l0: float, seed: int = 0) -> dict[str, SAE]:
    """The two baselines every eval scores: `{"random_directions": ..., "random_init": ...}`
    (`l0`: the trained SAE's mean L0 on the rows it is evaluated on)."""
    return {"random_directions": random_directions_sae(sae, l0, seed),
            "random_init": random_init_sae(sae, seed)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def margins(trained: dict, baselines: dict[str, dict],
            higher_is_better: dict[str, bool]) -> dict[str, dict[str, float]]:
    """`{baseline: {metric: margin}}` for every metric of `higher_is_better` that both the
    trained SAE and the baseline have a finite number for: trained − baseline where higher
    is better, baseline − trained where lower is (FVU), so positive = trained is better."""
    out = {}
    for name, scores in baselines.items():
        out[name] = {m: float(trained[m] - scores[m] if higher else scores[m] - trained[m])
                     for m, higher in higher_is_better.items()
                     if _number(trained.get(m)) and _number(scores.get(m))}
    return out


def score_baselines(baselines: dict[str, SAE], rows, trained: dict,
                    downstream_scores: dict[str, dict] | None = None) -> dict:
    """What `sae-jax eval` adds: `{"baselines": {name: {fvu, explained_variance, mse, l0,
    and fidelity_recovered or loss_recovered}}, "margins": {name: {metric: margin}}}`.

    Args:
      baselines: `baseline_saes(...)` of the trained SAE.
      trained: the trained SAE's eval result on `rows`.
      downstream_scores: `{name: {"fidelity_recovered" or "loss_recovered": ...}}`, the
        baselines' downstream numbers (`downstream.downstream(..., others=baselines)`),
        present only where the trained SAE's downstream measure ran.
    """
    scores = {}
    for name, baseline in baselines.items():
        row = row_metrics(eval_sums(baseline, rows), baseline.d_out)
        scores[name] = {**{k: row[k] for k in SCORED}, **(downstream_scores or {}).get(name, {})}
    return {"baselines": scores,
            "margins": margins({**trained, **recovered(trained)}, scores, HIGHER_IS_BETTER)}
