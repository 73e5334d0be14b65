"""TEMPORARY: a minimal core suite and random baselines for `sae-jax evals`, until the
metrics helper's `analysis.core_metrics.suite` and `analysis.baselines` are merged (issue 17).

`evals` imports those modules by name and falls back to this one only while they are
missing; delete this module when they land. Same contracts (issue17_contracts.md):
`core_suite(sae, store, args)` returns `{"metrics", "higher_is_better", "detail"}`, and
`baseline_saes` / `margins` have the signatures of `analysis.baselines`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import saes
from sae_jax.errors import UserError
from sae_jax.sae import SAE

HIGHER_IS_BETTER = {"fvu": False, "explained_variance": True, "mse": False, "l0": None,
                    "l0_p10": None, "l0_p50": None, "l0_p90": None, "dead_frac": False,
                    "dense_frac": False, "fidelity_recovered": True, "loss_recovered": True}
"""None: a property of the SAE, not a score (no margin over a baseline)."""


def core_suite(sae: SAE, store, args) -> dict:
    """`evaluate.evaluate` on the run's held-out rows, plus eval's downstream number
    (`fidelity_recovered` for MiniLM, `loss_recovered` for a causal LM) when the store is a
    model harvest and `args.fidelity_sequences` > 0."""
    from sae_jax.analysis.evaluate import downstream, evaluate

    rows = store.split(sae.config.holdout)[1]
    result = evaluate(sae, rows, getattr(args, "batch_size", 4096))
    metrics = {k: result[k] for k in HIGHER_IS_BETTER if k in result}
    if store.meta.get("source") == "harvest" and getattr(args, "fidelity_sequences", 0) > 0:
        down = downstream(sae, store, args)
        fidelity = down.get("fidelity") or {}
        metrics["fidelity_recovered"] = fidelity.get("fidelity_recovered")
        metrics["loss_recovered"] = down.get("loss_recovered")
    return {"metrics": metrics,
            "higher_is_better": {k: v for k, v in HIGHER_IS_BETTER.items()
                                 if k in metrics and v is not None},
            "detail": {"l0_hist": result["l0_hist"],
                       "feature_density": result["feature_density"]}}


def random_directions_sae(sae: SAE, l0: float, seed: int = 0) -> SAE:
    """Same width, TopK with k = round(l0), random unit decoder directions, encoder = their
    transpose, the trained decoder bias kept."""
    if sae.transcoder:
        raise UserError("evals baselines need an SAE, not a transcoder")
    k = int(min(sae.width, max(1, round(l0))))
    cfg = dataclasses.replace(sae.config, arch="topk", k=k, penalty=None, sparsity_coeff=None)
    u = np.random.default_rng(seed).standard_normal((sae.width, sae.d_in))
    u = (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)
    params = {"W_enc": jnp.asarray(u.T), "b_enc": jnp.zeros(sae.width, jnp.float32),
              "W_dec": jnp.asarray(u), "b_dec": jnp.asarray(sae.params["b_dec"])}
    return dataclasses.replace(sae, config=cfg, params=params)


def random_init_sae(sae: SAE, seed: int = 0) -> SAE:
    """The architecture's own fresh init at the same config and scale (decoder bias at the
    trained one, which training moves little from the data mean)."""
    params = saes.init(jax.random.key(seed), sae.config, sae.d_in,
                       data_mean=np.asarray(sae.params["b_dec"]), d_out=sae.d_out)
    return dataclasses.replace(sae, params=params)


def baseline_saes(sae: SAE, l0: float, seed: int = 0) -> dict[str, SAE]:
    return {"random_directions": random_directions_sae(sae, l0, seed),
            "random_init": random_init_sae(sae, seed)}


def margins(trained: dict, baselines: dict[str, dict], higher_is_better: dict[str, bool]
            ) -> dict[str, dict[str, float]]:
    """`{baseline: {metric: margin}}`, positive = the trained SAE is better."""
    out = {}
    for name, base in baselines.items():
        out[name] = {}
        for metric, higher in higher_is_better.items():
            t, b = trained.get(metric), base.get(metric)
            if t is not None and b is not None:
                out[name][metric] = (t - b) if higher else (b - t)
    return out
