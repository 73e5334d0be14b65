"""Evaluation of a trained SAE on held-out rows, streamed in batches.

Reports reconstruction (MSE, FVU, explained variance), sparsity (L0 mean, quantiles and its
exact distribution) and feature health (dead: never fired on the eval rows; dense: fires on
> 10% of them; the feature density histogram of log10 firing frequencies).
`write_eval_artifacts` writes the result as `eval.json` plus `feature_density.png`.
`sae-jax eval` adds what the model loses downstream when the SAE stands in for its layer
(`downstream`): embedding fidelity for a MiniLM store, next-token loss recovered for a
causal-LM store.

Numerics: each batch's sums are taken on the device in float32, but the data variance
(FVU's denominator) is accumulated *centred* and merged on the host in float64
(`moments.merge_moments`). Rows holding NaN or infinity are refused with one line: they
would turn every number into NaN, which is a damaged store, not an SAE result.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import files, plots
from sae_jax.analysis.moments import merge_moments
from sae_jax.batches import padded_batches
from sae_jax.errors import UserError
from sae_jax.sae import SAE

DENSE_FREQUENCY = 0.1
DENSITY_BIN_WIDTH = 0.25  # decades per bin of the feature density histogram
EVAL_JSON = "eval.json"
DENSITY_PNG = "feature_density.png"
LM_BATCH = 8  # sequences per causal-LM call for loss recovered (`loss_recovered.BATCH_SEQUENCES`)


@jax.jit
def _batch_sums(sae: SAE, rows, n_valid):
    """One batch's statistics in float32 (merged on the host in float64); rows from
    `n_valid` on are fill and count nowhere."""
    valid = jnp.arange(rows.shape[0]) < n_valid
    finite = jnp.isfinite(rows).all(-1)
    rows = jnp.where((valid & finite)[:, None], rows, 0.0)
    x_in, x = sae.split_rows(rows)  # x: what is reconstructed (a transcoder's target)
    f = sae.encode_raw(x_in)
    x_hat = sae.reconstruct_raw(x_in, f)
    active = (f > 0) & valid[:, None]
    mean = jnp.sum(x, axis=0) / n_valid
    return {
        "sq_err": jnp.sum(jnp.where(valid[:, None], jnp.square(x - x_hat), 0.0), axis=0),
        "mean": mean,
        "m2": jnp.sum(jnp.where(valid[:, None], jnp.square(x - mean), 0.0), axis=0),
        "l0": active.sum(-1),
        "fires": active.sum(0),
        "finite": finite | ~valid,
    }


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


def eval_sums(sae: SAE, rows, batch_size: int = 4096) -> dict:
    """The sums `evaluate` summarises, streamed over `rows` `batch_size` at a time: float64
    `sq_err` and centred `m2` (d_out,) of what is reconstructed, int64 `fires` (F,) (rows
    each feature fired on: `fires == 0` is what eval calls dead), int64 `l0` (n,) and `n`.
    `sae-jax prune` reads the per-feature `fires` that `evaluate` only reports in summary."""
    if rows.d_in != sae.row_width:
        raise UserError(f"eval data has d_in={rows.d_in}, but the SAE expects "
                        f"d_in={sae.row_width}")
    n = len(rows)
    if n == 0:
        raise UserError("no rows to evaluate")
    d = sae.d_out
    sq_err = np.zeros(d)
    count, mean, m2 = 0, np.zeros(d), np.zeros(d)
    fires, l0s = np.zeros(sae.width, np.int64), []
    for batch in padded_batches(n, batch_size, rows):
        m = batch.n_valid
        out = jax.device_get(_batch_sums(sae, batch.arrays[0].astype(np.float32), m))
        if not out["finite"].all():
            bad = batch.start + int(np.argmin(out["finite"]))
            raise UserError(f"eval row {bad} (row {getattr(rows, 'start', 0) + bad} of the "
                            "store) holds NaN or infinite values: the data is damaged; "
                            "re-import or re-harvest it")
        sq_err += out["sq_err"].astype(np.float64)
        count, mean, m2 = merge_moments(count, mean, m2, m, out["mean"].astype(np.float64),
                                        out["m2"].astype(np.float64))
        fires += out["fires"].astype(np.int64)
        l0s.append(out["l0"][:m])
    return {"n": int(n), "sq_err": sq_err, "m2": m2, "fires": fires,
            "l0": np.concatenate(l0s).astype(np.int64)}


def evaluate(sae: SAE, rows, batch_size: int = 4096) -> dict:
    """Evaluates `sae` on raw activation rows, reading `batch_size` rows at a time.

    Args:
      rows: a `store.RowSpan` or `loader.ArraySpan` (anything with `len`, `d_in`, `read`).
        For a transcoder, rows are input + target and every figure is about the target.

    Returns:
      A JSON-friendly dict: floats `mse` (mean per element, raw units), `fvu`,
      `explained_variance`, `l0`, `l0_p10/p50/p90`, `dead_frac`, `dense_frac`, int `n_rows`,
      `l0_hist` (see `l0_histogram`) and `feature_density` (see `density_histogram`).
    """
    sums = eval_sums(sae, rows, batch_size)
    n, fires, l0 = sums["n"], sums["fires"], sums["l0"]
    sq_err_total = float(sums["sq_err"].sum())
    total_var = float(sums["m2"].sum())
    freq = fires / n
    fvu = sq_err_total / total_var if total_var > 0 else float("nan")
    return {
        "n_rows": int(n),
        "mse": sq_err_total / (n * sae.d_out),
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": float(l0.mean()),
        "l0_p10": float(np.percentile(l0, 10)),
        "l0_p50": float(np.percentile(l0, 50)),
        "l0_p90": float(np.percentile(l0, 90)),
        "dead_frac": float(np.mean(fires == 0)),
        "dense_frac": float(np.mean(freq > DENSE_FREQUENCY)),
        "l0_hist": l0_histogram(l0),
        "feature_density": density_histogram(fires, n),
    }


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
    parser.add_argument("--fidelity-sequences", type=int, default=128,
                        help="held-out sequences for downstream fidelity (MiniLM) or loss "
                             "recovered (causal LMs) (default 128)")
    parser.add_argument("--corpus", nargs="+", metavar="PATH",
                        help="the corpus the store was harvested from, if not the default")
    parser.add_argument("--lm-batch", type=int, default=LM_BATCH, metavar="N",
                        help="sequences per causal-LM call for loss recovered; each call holds "
                             "the logits of 5 passes (clean and 4 spliced), so lower it for a "
                             f"large vocabulary (default {LM_BATCH})")
    parser.add_argument("--mesh", default="", metavar="SPEC",
                        help="mesh to run a causal LM on for loss recovered, e.g. "
                             "data:2,model:4 (default: every device on data)")


def downstream(sae: SAE, store, args, mesh=None) -> dict:
    """What the model loses when the SAE stands in for its layer, as eval reports it: for a
    causal-LM store `lm_loss` (`loss_recovered.loss_recovered`) and its `loss_recovered`
    number, for a MiniLM store `fidelity` (`fidelity.downstream_fidelity`); None with one
    warning line where it cannot be measured (not a harvested store, no corpus, no model)."""
    from sae_jax.lm.hooks import is_causal

    if is_causal(store.meta):
        from sae_jax.analysis.loss_recovered import loss_recovered

        try:
            lm = loss_recovered(sae, store, n_sequences=args.fidelity_sequences,
                                corpus=args.corpus, mesh=mesh,
                                batch_sequences=getattr(args, "lm_batch", LM_BATCH))
        except UserError as e:
            print(f"sae-jax: warning: loss recovered skipped: {e}", file=sys.stderr)
            return {"lm_loss": None, "loss_recovered": None}
        return {"lm_loss": lm, "loss_recovered": lm["loss_recovered"]}
    from sae_jax.analysis.fidelity import downstream_fidelity

    try:
        return {"fidelity": downstream_fidelity(sae, store, n_sequences=args.fidelity_sequences,
                                                corpus=args.corpus)}
    except UserError as e:  # not a harvested store, or its corpus cannot be rebuilt
        print(f"sae-jax: warning: fidelity skipped: {e}", file=sys.stderr)
        return {"fidelity": None}


def run(args) -> dict:
    """`sae-jax eval`: core metrics on the held-out rows, and what the model loses downstream
    (`downstream`) where the store was harvested from a model we can run, written to
    RUN_DIR/eval."""
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
    result = {"step": sae.step, "split": args.split, **evaluate(sae, rows)}
    result.update(downstream(sae, store, args, mesh))
    write_eval_artifacts(result, files.join(args.run_dir, "eval"))
    return result
