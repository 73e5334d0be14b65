"""Scaling laws of SAE training: fit loss against compute, and the compute-optimal size.

Scaling Monosemanticity chose its SAEs from a sweep: loss falls as a power law in training
compute, and the loss-optimal number of features and of steps at a fixed compute are power
laws in that compute too. This module fits those three laws to a sweep and plots them; it
is pure numpy/scipy (no JAX), so a sweep measured anywhere can be fitted on a laptop.

A *point* is one trained SAE: `{"width": F, "steps": S, "tokens": T, "flops": C, "loss": L}`
(other keys are kept). C is the run's training FLOPs as `sae_jax.planning.cost.run_flops` counts
them; L is whatever loss the sweep compares (e.g. held-out FVU or the training loss).

Definitions (what `fit_scaling` returns):

* **Loss vs compute**: L(C) = L_inf + a·C^(−alpha), fitted by least squares on log L
  (noise is multiplicative: a 2% error weighs the same at every scale), with C divided by
  its geometric mean during the fit so the three parameters are of order one, L_inf bounded
  to [0, min L]. `L_inf_err`, `a_err`, `alpha_err` are 1σ errors from the covariance
  s²·(JᵀJ)⁻¹ of the log-residuals (s² = residual sum of squares / (n − 3); null when
  n = 3). `r2` = 1 − SS_res/SS_tot of log L (the quantity fitted).
* **Frontier**: the points no point of lower or equal compute beats (strictly lower loss at
  C' ≤ C); the loss law is fitted on the frontier only, because an off-frontier point is a
  badly sized run, not the best loss that compute can buy.
* **Held-out point**: with `holdout_largest=True`, the frontier point of largest compute is
  left out of the loss fit and predicted instead; `heldout_rel_error` =
  |predicted − measured| / measured (the signed value is `heldout.rel_error`).
* **Iso-compute optimum**: points whose log10 C lie within `tol_log10` of each other form a
  group (a width × steps grid with the same log spacing on both axes puts equal-compute
  points on its diagonals). In a group of ≥ 3 widths, a parabola in log width through the
  best point and its two neighbours gives the optimal width (its vertex) and loss; the
  optimal steps is log-linearly interpolated at that width. A group whose best point is its
  smallest or largest width is *not interior* (the optimum may lie outside the grid) and
  is excluded from the laws below.
* **Optimal width and steps**: pure power laws F*(C) = coef·C^exponent and
  S*(C) = coef·C^exponent, fitted by linear regression of log F* (log S*) on log C over
  the interior groups; 1σ errors from the regression (null with fewer than 3 groups); `r2`
  in log space. Null when fewer than 2 interior groups exist.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import optimize

from sae_jax import files, plots
from sae_jax.errors import UserError

FIT_FILE = "scaling_fit.json"
FIT_KIND = "sae_jax.scaling_fit"
FIT_VERSION = 1
POINT_KEYS = ("width", "steps", "tokens", "flops", "loss")
ISO_TOL_LOG10 = 0.1
"""Default tolerance in log10 C for "equal compute": below half the gap between the
diagonals of a factor-2 grid (log10 2 = 0.3 apart in C), above the spread the sparse TopK
FLOP count (2dF + 10dk, not exactly ∝ F) puts on one diagonal."""


# ----------------------------------------------------------------------------- fits


def _r2(y: np.ndarray, y_hat: np.ndarray) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - y_hat) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)


def _positive_array(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise UserError(f"{name} must be finite and positive")
    return arr


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _initial_guess(log_x: np.ndarray, log_y: np.ndarray, y_min: float) -> np.ndarray:
    """(L_inf, log a', alpha) from a grid over L_inf: for each, log(L − L_inf) is linear in
    log x; the candidate with the smallest residual on log L starts the nonlinear fit."""
    best, best_sse = None, np.inf
    for frac in (0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98):
        l_inf = frac * y_min
        slope, intercept = np.polyfit(log_x, np.log(np.exp(log_y) - l_inf), 1)
        alpha = max(-slope, 1e-3)
        pred = np.log(l_inf + np.exp(intercept - alpha * log_x))
        sse = float(np.sum((pred - log_y) ** 2))
        if sse < best_sse:
            best, best_sse = np.array([l_inf, intercept, alpha]), sse
    return best


def fit_power_law(compute, loss) -> dict:
    """Fits L(C) = L_inf + a·C^(−alpha) (see the module docstring for the method).

    Args:
      compute: training FLOPs per point (positive).
      loss: the loss reached at each (positive).

    Returns:
      `{"L_inf", "a", "alpha", "L_inf_err", "a_err", "alpha_err", "r2", "n_points"}`;
      errors are 1σ, or None where the fit has no degrees of freedom left.
    """
    c, y = _positive_array(compute, "compute"), _positive_array(loss, "loss")
    if c.shape != y.shape:
        raise UserError(f"compute and loss differ in length ({c.size} vs {y.size})")
    if c.size < 3 or np.unique(c).size < 3:
        raise UserError(f"a power law with an offset needs >= 3 distinct compute values, "
                        f"got {np.unique(c).size}")
    log_c0 = float(np.mean(np.log(c)))  # fit in x = C / geomean(C): parameters of order one
    log_x, log_y = np.log(c) - log_c0, np.log(y)

    def residuals(p):
        l_inf, log_a, alpha = p
        return np.log(l_inf + np.exp(log_a - alpha * log_x)) - log_y

    p0 = _initial_guess(log_x, log_y, float(y.min()))
    lower, upper = [0.0, -np.inf, 1e-6], [float(y.min()), np.inf, 10.0]
    p0 = np.clip(p0, lower, upper)
    try:  # even when it stops at max_nfev, `sol.x` is the best point it found
        sol = optimize.least_squares(residuals, p0, bounds=(lower, upper), method="trf",
                                     x_scale="jac", max_nfev=2000)
        params, jac = sol.x, sol.jac
    except (ValueError, np.linalg.LinAlgError):  # degenerate data: keep the linear guess
        params, jac = p0, optimize.approx_fprime(p0, residuals)
    l_inf, log_a_norm, alpha = (float(v) for v in params)
    res = residuals(params)
    dof = c.size - 3
    cov = np.full((3, 3), np.nan)
    if dof > 0:
        cov = np.linalg.pinv(jac.T @ jac) * float(res @ res) / dof
    # back to raw C: a = a'·C0^alpha, so log a = log a' + alpha·log C0
    log_a = log_a_norm + alpha * log_c0
    var_log_a = cov[1, 1] + log_c0**2 * cov[2, 2] + 2 * log_c0 * cov[1, 2]
    return {
        "L_inf": l_inf, "a": math.exp(log_a), "alpha": alpha,
        "L_inf_err": _none_if_nan(math.sqrt(max(cov[0, 0], 0.0))),
        "a_err": _none_if_nan(math.exp(log_a) * math.sqrt(max(var_log_a, 0.0))),
        "alpha_err": _none_if_nan(math.sqrt(max(cov[2, 2], 0.0))),
        "r2": _r2(log_y, res + log_y), "n_points": int(c.size),
    }


def predict(fit: dict, compute) -> np.ndarray | float:
    """L(C) of a `fit_power_law` result (a float for a scalar `compute`)."""
    c = np.asarray(compute, dtype=np.float64)
    value = fit["L_inf"] + np.exp(math.log(fit["a"]) - fit["alpha"] * np.log(c))
    return float(value) if value.ndim == 0 else value


def fit_pure_power_law(x, y) -> dict:
    """Fits y = coef·x^exponent by linear regression of log y on log x.

    log x is centred before the regression so slope and intercept are uncorrelated, and the
    error of coef (at x = 1, far from the data) comes out right.

    Returns:
      `{"coef", "exponent", "coef_err", "exponent_err", "r2", "n_points"}`; errors are 1σ,
      None with fewer than 3 points.
    """
    lx, ly = np.log(_positive_array(x, "x")), np.log(_positive_array(y, "y"))
    if lx.shape != ly.shape:
        raise UserError(f"x and y differ in length ({lx.size} vs {ly.size})")
    if lx.size < 2 or np.ptp(lx) == 0:
        raise UserError("a power law needs >= 2 distinct x values")
    mean = float(lx.mean())
    centred = lx - mean
    sxx = float(centred @ centred)
    exponent = float(centred @ (ly - ly.mean()) / sxx)
    intercept = float(ly.mean())  # log y at the mean log x
    fitted = intercept + exponent * centred
    dof = lx.size - 2
    s2 = float(np.sum((ly - fitted) ** 2)) / dof if dof > 0 else math.nan
    var_exponent, var_intercept = s2 / sxx, s2 / lx.size
    log_coef = intercept - exponent * mean
    coef = math.exp(log_coef)
    return {"coef": coef, "exponent": exponent,
            "coef_err": _none_if_nan(coef * math.sqrt(var_intercept + mean**2 * var_exponent)),
            "exponent_err": _none_if_nan(math.sqrt(var_exponent)),
            "r2": _r2(ly, fitted), "n_points": int(lx.size)}


def predict_pure(fit: dict, x) -> np.ndarray | float:
    """y(x) of a `fit_pure_power_law` result."""
    value = fit["coef"] * np.power(np.asarray(x, dtype=np.float64), fit["exponent"])
    return float(value) if np.ndim(value) == 0 else value


# ----------------------------------------------------------------------------- sweep points


def check_points(points) -> list[dict]:
    """The points as dicts, or a UserError naming the first bad one."""
    if not isinstance(points, (list, tuple)) or not points:
        raise UserError("a sweep needs a non-empty list of points")
    for i, point in enumerate(points):
        if not isinstance(point, dict):
            raise UserError(f"sweep point {i} is not an object")
        missing = [k for k in POINT_KEYS if k not in point]
        if missing:
            raise UserError(f"sweep point {i} lacks {', '.join(missing)}")
        for key in POINT_KEYS:
            value = point[key]
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value <= 0):
                raise UserError(f"sweep point {i}: {key}={value!r} must be a positive number")
    return list(points)


def loss_frontier(points) -> list[dict]:
    """The compute-efficient frontier: points with strictly lower loss than every point of
    lower or equal compute, in increasing compute (ties in compute keep the best only)."""
    best = math.inf
    frontier = []
    for point in sorted(check_points(points), key=lambda p: (p["flops"], p["loss"])):
        if point["loss"] < best:
            frontier.append(point)
            best = point["loss"]
    return frontier


def iso_compute_groups(points, tol_log10: float = ISO_TOL_LOG10) -> list[list[dict]]:
    """Points grouped by (nearly) equal compute: walking up in log10 C, a point joins the
    current group while it is within `tol_log10` of the group's first point."""
    groups: list[list[dict]] = []
    for point in sorted(check_points(points), key=lambda p: p["flops"]):
        if groups and math.log10(point["flops"] / groups[-1][0]["flops"]) <= tol_log10:
            groups[-1].append(point)
        else:
            groups.append([point])
    return groups


def _group_optimum(group: list[dict]) -> dict:
    """Loss-optimal width and steps of one iso-compute group (module docstring)."""
    group = sorted(group, key=lambda p: p["width"])
    log_w = np.log([p["width"] for p in group])
    log_s = np.log([p["steps"] for p in group])
    loss = np.array([p["loss"] for p in group], dtype=np.float64)
    i = int(np.argmin(loss))
    interior = 0 < i < len(group) - 1
    best_w, best_s, best_loss = log_w[i], log_s[i], float(loss[i])
    if interior:
        window = slice(i - 1, i + 2)
        curv, slope, const = np.polyfit(log_w[window], loss[window], 2)
        if curv > 0:  # a minimum: its vertex, kept between the neighbours
            best_w = float(np.clip(-slope / (2 * curv), log_w[i - 1], log_w[i + 1]))
            best_loss = float(np.polyval([curv, slope, const], best_w))
            best_s = float(np.interp(best_w, log_w[window], log_s[window]))
    return {"flops": float(np.exp(np.mean(np.log([p["flops"] for p in group])))),
            "n_points": len(group), "width": float(np.exp(best_w)),
            "steps": float(np.exp(best_s)), "loss": best_loss, "interior": bool(interior),
            "best_point": files.json_safe(group[i])}


def compute_optimal(points, tol_log10: float = ISO_TOL_LOG10) -> list[dict]:
    """Iso-compute analysis: per group of equal compute, the loss-optimal width and steps.

    Returns:
      One dict per group, in increasing compute: `{"flops", "n_points", "width", "steps",
      "loss", "interior", "best_point"}`. Only groups with `interior` true bracket their
      optimum; `fit_scaling` fits the width and steps laws on those alone.
    """
    return [_group_optimum(g) for g in iso_compute_groups(points, tol_log10)]


def _law_or_none(groups: list[dict], key: str) -> dict | None:
    if len(groups) < 2:
        return None
    return fit_pure_power_law([g["flops"] for g in groups], [g[key] for g in groups])


def fit_scaling(points, holdout_largest: bool = True, tol_log10: float = ISO_TOL_LOG10) -> dict:
    """The three scaling laws of a sweep, as one JSON-able result.

    Fitted points: the loss law on the frontier (`loss_frontier`) minus, when
    `holdout_largest`, its largest-compute point, which is predicted instead; the width and
    steps laws on the interior iso-compute groups of *all* points (`compute_optimal`).
    Every point is returned with `role` = "fit" (frontier, fitted), "heldout", or
    "off_frontier" (not fitted).

    Args:
      points: sweep points (module docstring).
      holdout_largest: hold out the frontier's largest-compute point.
      tol_log10: log10 C tolerance of an iso-compute group.

    Returns:
      `{"kind", "version", "loss_vs_compute", "optimal_width", "optimal_steps",
      "iso_compute", "heldout", "r2", "heldout_rel_error", "tokens_per_step", "d_in",
      "points"}` (`optimal_*` and `heldout` may be None; `tokens_per_step` is the sweep's
      median batch size in tokens; `d_in` the points' shared `d_in` key, if any).
    """
    points = check_points(points)
    frontier = loss_frontier(points)
    fitted, heldout_point = (frontier[:-1], frontier[-1]) if holdout_largest else (frontier, None)
    if len(fitted) < 3:
        raise UserError(f"the loss law needs >= 3 frontier points to fit"
                        f"{' besides the held-out one' if holdout_largest else ''}; this sweep "
                        f"has {len(frontier)} on its frontier (of {len(points)} points)")
    loss_fit = fit_power_law([p["flops"] for p in fitted], [p["loss"] for p in fitted])
    heldout = None
    if heldout_point is not None:
        predicted = predict(loss_fit, heldout_point["flops"])
        rel = (predicted - heldout_point["loss"]) / heldout_point["loss"]
        heldout = {"flops": float(heldout_point["flops"]),
                   "measured": float(heldout_point["loss"]),
                   "predicted": predicted, "rel_error": rel}
    groups = compute_optimal(points, tol_log10)
    interior = [g for g in groups if g["interior"]]
    fitted_ids = {id(p) for p in fitted}
    roles = [("fit" if id(p) in fitted_ids else
              "heldout" if p is heldout_point else "off_frontier") for p in points]
    return files.json_safe({
        "kind": FIT_KIND, "version": FIT_VERSION,
        "loss_vs_compute": loss_fit,
        "optimal_width": _law_or_none(interior, "width"),
        "optimal_steps": _law_or_none(interior, "steps"),
        "iso_compute": groups, "iso_tol_log10": tol_log10,
        "heldout": heldout, "r2": loss_fit["r2"],
        "heldout_rel_error": None if heldout is None else abs(heldout["rel_error"]),
        "tokens_per_step": float(np.median([p["tokens"] / p["steps"] for p in points])),
        "d_in": _shared_value(points, "d_in"),
        "points": [{**p, "role": r} for p, r in zip(points, roles)],
    })


def _shared_value(points: list[dict], key: str):
    """`key`'s value if every point has the same one (e.g. the sweep's d_in), else None."""
    values = {p.get(key) for p in points}
    return values.pop() if len(values) == 1 else None


# ----------------------------------------------------------------------------- files


def write_fit(result: dict, out_dir) -> str:
    """Writes `out_dir/scaling_fit.json` (local or `gs://`) and returns its path."""
    path = files.join(out_dir, FIT_FILE)
    files.write_text(path, files.strict_json(result, indent=1) + "\n")
    return path


def _check_law(fit: dict, name: str, keys: tuple[str, ...]) -> None:
    law = fit.get(name)
    if law is None:
        return
    if not isinstance(law, dict) or any(
            not isinstance(law.get(k), (int, float)) or not math.isfinite(law[k]) for k in keys):
        raise UserError(f"scaling fit: {name} must hold finite numbers {', '.join(keys)}")


def read_fit(path) -> dict:
    """Reads a `write_fit` file (or the directory holding one) and checks its laws.

    Raises:
      UserError: the file is missing, not JSON, not a scaling fit, or a law is damaged.
    """
    path = str(path)
    if not files.is_remote(path) and Path(path).is_dir():
        path = files.join(path, FIT_FILE)
    fit = files.read_json(path, f"no scaling fit at {path}")
    if not isinstance(fit, dict) or fit.get("kind") != FIT_KIND:
        raise UserError(f"{path} is not a scaling fit (written by "
                        "sae_jax.planning.scaling.write_fit)")
    if fit.get("version") != FIT_VERSION:
        raise UserError(f"scaling fit {path} has version {fit.get('version')!r}; "
                        f"this sae_jax reads version {FIT_VERSION}")
    if not isinstance(fit.get("loss_vs_compute"), dict):
        raise UserError(f"scaling fit {path} has no loss_vs_compute law")
    _check_law(fit, "loss_vs_compute", ("L_inf", "a", "alpha"))
    for name in ("optimal_width", "optimal_steps"):
        _check_law(fit, name, ("coef", "exponent"))
    return fit


# ----------------------------------------------------------------------------- plots


def _compute_grid(values) -> np.ndarray:
    lo, hi = np.log10(min(values)), np.log10(max(values))
    pad = 0.05 * max(hi - lo, 0.1)
    return np.logspace(lo - pad, hi + pad, 200)


def plot_loss_vs_compute(points, fit: dict) -> bytes:
    """Log-log loss vs compute, PNG bytes: every point coloured by width, the frontier, the
    fitted law and the held-out point.

    Args:
      points: sweep points.
      fit: a `fit_scaling` result (or a bare `fit_power_law` result: no held-out marker).
    """
    from matplotlib import colors

    points = check_points(points)
    law = fit.get("loss_vs_compute", fit)
    heldout = fit.get("heldout")
    fig, (ax,) = plots.figure(7.0, 4.5)
    widths = np.array([p["width"] for p in points], dtype=np.float64)
    norm = colors.LogNorm(widths.min(), widths.max() * (1.0001 if np.ptp(widths) == 0 else 1))
    scatter = ax.scatter([p["flops"] for p in points], [p["loss"] for p in points], c=widths,
                         cmap="viridis", norm=norm, s=28, zorder=3, label="runs")
    fig.colorbar(scatter, ax=ax, label="width (features)")
    frontier = loss_frontier(points)
    ax.plot([p["flops"] for p in frontier], [p["loss"] for p in frontier], color="gray",
            linewidth=1, zorder=2, label="frontier")
    grid = _compute_grid([p["flops"] for p in points])
    ax.plot(grid, predict(law, grid), color="tab:red", linestyle="--", zorder=4,
            label=(f"L = {law['L_inf']:.3g} + {law['a']:.3g}·C^-{law['alpha']:.3f}"
                   f" (R² {law['r2']:.3f})"))
    if heldout is not None:
        ax.scatter([heldout["flops"]], [heldout["measured"]], marker="*", s=220,
                   facecolor="none", edgecolor="black", zorder=5,
                   label=f"held out (predicted {heldout['rel_error']:+.1%})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("loss")
    ax.set_title("Loss vs compute")
    ax.legend(fontsize=8)
    return plots.png(fig)


def plot_optimal(result: dict) -> bytes:
    """Compute-optimal width and steps vs compute with their power laws, PNG bytes.

    Args:
      result: a `fit_scaling` result.
    """
    fig, axes = plots.figure(11.0, 4.5, 2)
    groups = result["iso_compute"]
    for ax, key, label in ((axes[0], "width", "optimal width (features)"),
                           (axes[1], "steps", "optimal steps")):
        for interior, style in ((True, {"color": "tab:blue"}),
                                (False, {"facecolor": "none", "edgecolor": "tab:blue"})):
            chosen = [g for g in groups if g["interior"] is interior]
            if chosen:
                ax.scatter([g["flops"] for g in chosen], [g[key] for g in chosen], s=30,
                           zorder=3, label="interior optimum" if interior else
                           "at the grid's edge (not fitted)", **style)
        law = result.get(f"optimal_{key}")
        if law is not None:
            grid = _compute_grid([g["flops"] for g in groups])
            ax.plot(grid, predict_pure(law, grid), color="tab:red", linestyle="--",
                    label=f"∝ C^{law['exponent']:.3f} (R² {law['r2']:.3f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize() + " vs compute")
        ax.legend(fontsize=8)
    return plots.png(fig)
