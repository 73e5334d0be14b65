"""Evaluation of a trained SAE on held-out rows, streamed in batches: `sae-jax eval`.

Reports the core metrics (`core_metrics`: reconstruction, L0 and its percentiles, dead and
dense fractions, shrinkage, decoder similarity, encoder/decoder alignment) from one pass
over the rows, plus the exact L0 distribution and the feature density histogram of log10
firing frequencies. `write_eval_artifacts` writes the result as `eval.json` plus
`feature_density.png`. `sae-jax eval` adds what the model loses downstream when the SAE
stands in for its layer (`downstream`: embedding fidelity for a MiniLM store, next-token
loss recovered for a causal-LM store) and the same numbers for two random baselines of the
same width and L0 (`baselines`), with the trained SAE's margin over each.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from sae_jax import files, plots
from sae_jax.analysis.core_metrics import (
    DENSE_FREQUENCY,
    decoder_init_cosine,
    eval_sums,
    row_metrics,
    shrinkage_by_l0,
    weight_metrics,
)
from sae_jax.analysis.downstream import LM_BATCH, downstream
from sae_jax.analysis.downstream import add_arguments as downstream_arguments
from sae_jax.errors import UserError
from sae_jax.sae import SAE
from sae_jax.saes.common import decoder_blocks

DENSITY_BIN_WIDTH = 0.25  # decades per bin of the feature density histogram
EVAL_JSON = "eval.json"
DENSITY_PNG = "feature_density.png"
BASELINE_SEED = 0


def l0_histogram(l0: np.ndarray) -> dict:
    """Exact L0 distribution: `{"values": [...], "counts": [...]}` for each L0 that occurs."""
    values, counts = np.unique(np.asarray(l0, np.int64), return_counts=True)
    return {"values": values.tolist(), "counts": counts.tolist()}


def density_histogram(fires: np.ndarray, n_rows: int,
                      bin_width: float = DENSITY_BIN_WIDTH) -> dict:
    """Histogram of log10(firing frequency) over the features that fired at least once.

    Bins are `bin_width` decades wide and aligned to multiples of it, from the bin holding
    log10(1 / n_rows) (a feature firing once) up to 0 (a feature firing on every row); dead
    features (frequency 0, log10 = -inf) are counted in `n_dead`, outside the bins.
    """
    fires = np.asarray(fires, np.int64)
    alive = fires > 0
    log_freq = np.log10(fires[alive] / float(n_rows))
    lo = math.floor(math.log10(1.0 / n_rows) / bin_width + 1e-9) * bin_width
    n_bins = max(1, math.ceil(-lo / bin_width - 1e-9))
    edges = lo + bin_width * np.arange(n_bins + 1)
    edges[-1] = 0.0
    counts, _ = np.histogram(log_freq, bins=edges)  # the last bin includes 0 (every row)
    return {
        "bin_edges_log10": [round(float(e), 6) for e in edges],
        "counts": counts.tolist(),
        "n_dead": int((~alive).sum()),
        "n_features": int(fires.size),
        "n_rows": int(n_rows),
        "log10_freq_p10": float(np.percentile(log_freq, 10)) if alive.any() else None,
        "log10_freq_p50": float(np.percentile(log_freq, 50)) if alive.any() else None,
        "log10_freq_p90": float(np.percentile(log_freq, 90)) if alive.any() else None,
    }


def evaluate(sae: SAE, rows, batch_size: int = 4096) -> dict:
    """Evaluates `sae` on raw activation rows, reading `batch_size` rows at a time.

    Args:
      rows: a `store.RowSpan` or `loader.ArraySpan` (anything with `len`, `d_in`, `read`).
        For a transcoder, rows are input + target and every figure is about the target.

    Returns:
      A JSON-friendly dict: the flat `core_metrics` (floats `mse` (per element, raw units),
      `fvu`, `explained_variance`, `l0`, `l0_p1` … `l0_p99`, `dead_frac`, `dense_frac`,
      `shrinkage`, `decoder_sim_mean`, `decoder_sim_dup_frac`, `enc_dec_cos_mean/median`,
      int `n_rows`), `shrinkage_by_l0`, for a crosscoder or CLT `fvu_per_block` (the FVU of
      each decoder block: each source, or each target layer of a CLT, in row order),
      `l0_hist` (see `l0_histogram`) and `feature_density` (see `density_histogram`).
    """
    sums = eval_sums(sae, rows, batch_size)
    blocks = decoder_blocks(sae.config)
    per_block = {} if not blocks or len(blocks) < 2 else {
        "fvu_per_block": block_fvu(sums["sq_err"], sums["m2"], blocks)}
    return {**row_metrics(sums, sae.d_out), **per_block, **weight_metrics(sae),
            "shrinkage_by_l0": shrinkage_by_l0(sums["norm_ratio"], sums["l0"]),
            "l0_hist": l0_histogram(sums["l0"]),
            "feature_density": density_histogram(sums["fires"], sums["n"])}


def block_fvu(sq_err: np.ndarray, m2: np.ndarray, widths: tuple[int, ...]) -> list:
    """FVU of each consecutive column block of the given widths (None where the block's
    data has no variance)."""
    bounds = np.cumsum((0, *widths))
    return [float(sq_err[a:b].sum() / m2[a:b].sum()) if m2[a:b].sum() > 0 else None
            for a, b in zip(bounds, bounds[1:])]


def plot_feature_density(density: dict, title: str | None = None) -> bytes:
    """Bar chart of a `density_histogram` (dead features as a separate red bar), PNG bytes."""
    edges = np.asarray(density["bin_edges_log10"], float)
    counts = np.asarray(density["counts"], float)
    fig, (ax,) = plots.figure(7, 4)
    width = np.diff(edges)
    ax.bar(edges[:-1], counts, width=width, align="edge", color="tab:blue",
           edgecolor="white", label="alive features")
    ax.bar([edges[0] - 2 * width[0]], [density["n_dead"]], width=width[0], align="edge",
           color="tab:red", label=f"dead ({density['n_dead']} of {density['n_features']})")
    ax.axvline(np.log10(DENSE_FREQUENCY), color="gray", linestyle="--", linewidth=1,
               label=f"dense threshold ({DENSE_FREQUENCY:g})")
    ax.set_xlabel(f"log10 firing frequency (over {density['n_rows']} rows)")
    ax.set_ylabel("features")
    ax.set_title(title or "Feature density")
    ax.legend(fontsize=8)
    return plots.png(fig)


def write_eval_artifacts(result: dict, out_dir: str | os.PathLike) -> dict:
    """Writes `out_dir/eval.json` (every number of `result`, strict JSON: NaN -> null) and
    `out_dir/feature_density.png`, creating a local `out_dir` (or writing to `gs://...`).

    Args:
      result: an `evaluate` result; other keys (`step`, `fidelity`, ...) go into the JSON.

    Returns:
      `{"json": path, "png": path}` (`png` is None if `result` has no `feature_density`).
    """
    out = str(out_dir).rstrip("/")
    if not files.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    text = files.strict_json(result, indent=1) + "\n"
    files.write_bytes(files.join(out, EVAL_JSON), text.encode())
    png = None
    if "feature_density" in result:
        title = "Feature density" + (f" at step {result['step']}" if "step" in result else "")
        files.write_bytes(files.join(out, DENSITY_PNG),
                          plot_feature_density(result["feature_density"], title))
        png = files.join(out, DENSITY_PNG)
    return {"json": files.join(out, EVAL_JSON), "png": png}


def add_arguments(parser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("data_dir")
    parser.add_argument("--split", choices=("heldout", "all"), default="heldout",
                        help="rows to evaluate on (default: the held-out tail of the store)")
    downstream_arguments(parser)
    parser.add_argument("--mesh", default="", metavar="SPEC",
                        help="mesh to run a causal LM on for loss recovered, e.g. "
                             "data:2,model:4 (default: every device on data)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the random baselines (one more pass over the rows each, "
                             "and one more downstream measure each where it runs)")


def run(args) -> dict:
    """`sae-jax eval`: core metrics on the held-out rows, what the model loses downstream
    (`downstream`) where the store was harvested from a model we can run, and (unless
    `--no-baselines`) `baselines` and `margins` (`baselines.score_baselines`), written to
    RUN_DIR/eval."""
    from sae_jax.analysis.baselines import baseline_saes, score_baselines
    from sae_jax.data.store import open_store
    from sae_jax.mesh import make_mesh
    from sae_jax.sae import load

    mesh = make_mesh(args.mesh)  # a bad spec is refused before anything is computed
    lm_batch = getattr(args, "lm_batch", LM_BATCH)  # bundle and prune build their own args
    if lm_batch < 1:
        raise UserError(f"--lm-batch must be at least 1, got {lm_batch}")
    sae = load(args.run_dir)
    files.ensure_writable_dir(files.join(args.run_dir, "eval"), "the eval results")
    store = open_store(args.data_dir)
    if store.d_in != sae.row_width:
        raise UserError(f"store {args.data_dir} has d_in={store.d_in}, but the SAE in "
                        f"{args.run_dir} was trained on d_in={sae.row_width}")
    rows = store.span() if args.split == "all" else store.split(sae.config.holdout)[1]
    result = {"step": sae.step, "split": args.split, **evaluate(sae, rows),
              "decoder_init_cos": decoder_init_cosine(sae, args.run_dir)}
    baselines = (None if getattr(args, "no_baselines", False)  # bundle builds its own args
                 else baseline_saes(sae, result["l0"], BASELINE_SEED))
    lost = downstream(sae, store, args, mesh, others=baselines)
    others = lost.pop("others", None)
    result.update(lost)
    if baselines is not None:
        result.update(score_baselines(baselines, rows, result, others))
    write_eval_artifacts(result, files.join(args.run_dir, "eval"))
    return result
