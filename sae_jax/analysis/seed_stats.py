"""Across-seed statistics of an evaluation: mean ± 95 % confidence interval, and PW-MCC.

A metric measured on one SAE is one draw from the distribution over training seeds; without
an interval it cannot say whether SAE A beats SAE B or a baseline (arXiv 2605.18229).

**Confidence interval.** For the values x_1..x_n of n runs (one per seed):
mean m = Σx_i / n, sample standard deviation s (n − 1 in the denominator), and the 95 %
interval m ± t_{0.975, n−1} · s / √n, with t the Student t quantile of n − 1 degrees of
freedom (12.706 for n = 2, 4.303 for n = 3, → 1.960 as n grows). One run has no spread to
estimate: its interval is null, with a note.

**PW-MCC** (pairwise mean correlation coefficient of features): for every pair of runs, the
mean cosine of the one-to-one matching of their decoder directions
(`matching.match_features(...)["matched_cosine_mean"]`, what `sae-jax compare` reports); 1
when the runs learned the same dictionary, ~0 for unrelated ones. Reported over all pairs,
with the pairs' mean ± CI (the pairs share runs, so that interval is a rough guide).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

CI_LEVEL = 0.95
ONE_RUN_NOTE = "one run: no confidence interval (train more seeds, e.g. seed=0,1,2)"


def t_quantile(p: float, dof: int) -> float:
    """The `p` quantile of Student's t distribution with `dof` degrees of freedom."""
    from scipy.special import stdtrit

    if dof < 1 or not 0 < p < 1:
        raise ValueError(f"t quantile needs dof >= 1 and 0 < p < 1, got {dof}, {p}")
    return float(stdtrit(dof, p))


def mean_ci(values, level: float = CI_LEVEL) -> dict:
    """`{"mean", "ci_low", "ci_high", "half_width", "std", "n"}` of the non-null `values`
    (Student t interval, n − 1 degrees of freedom; module docstring). With one value the
    interval fields are None and `note` says why; with none, everything is None."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    n = int(x.size)
    out = {"mean": float(x.mean()) if n else None, "ci_low": None, "ci_high": None,
           "half_width": None, "std": float(x.std(ddof=1)) if n > 1 else None, "n": n}
    if n == 1:
        out["note"] = ONE_RUN_NOTE
    if n > 1:
        half = t_quantile(0.5 + level / 2, n - 1) * out["std"] / math.sqrt(n)
        out.update(ci_low=out["mean"] - half, ci_high=out["mean"] + half, half_width=half)
    return out


def pw_mcc(decoders: list, names: list[str]) -> dict:
    """PW-MCC of runs with decoders `(F, d)`: `pairs` `[{"a", "b", "value"}]` of every pair
    of runs, and their `mean_ci`; with fewer than two runs the value is None with a note."""
    from sae_jax.analysis.matching import match_features

    pairs = [{"a": names[i], "b": names[j],
              "value": float(match_features(decoders[i], decoders[j])["matched_cosine_mean"])}
             for i, j in itertools.combinations(range(len(decoders)), 2)]
    out = {"pairs": pairs, **mean_ci([p["value"] for p in pairs])}
    out.pop("note", None)
    if len(pairs) < 2:
        out["note"] = ("PW-MCC needs at least two runs" if not pairs else
                       "one pair of runs: no confidence interval (train three or more seeds)")
    return out


def across_runs(per_run: list[dict]) -> dict:
    """`{metric: {"per_run": [...], **mean_ci}}` over the metric dicts of several runs (a
    metric missing from a run counts as null there)."""
    names = list(dict.fromkeys(k for m in per_run for k in m))
    out = {}
    for name in names:
        values = [m.get(name) for m in per_run]
        out[name] = {"per_run": values, **mean_ci(values)}
    return out
