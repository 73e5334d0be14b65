"""`sae-jax diff RUN`: model diffing with a crosscoder (Lindsey et al. 2024).

A crosscoder latent has one decoder per source (`saes.crosscoder`). For two sources A and B
its relative decoder norm r = ‖d_B‖ / (‖d_A‖ + ‖d_B‖) says where it writes: r ≈ 0 only to A,
r ≈ 1 only to B, r ≈ ½ equally to both. Every latent is classed by r:

    A-only   r < EXCLUSIVE                (0.1)
    B-only   r > 1 − EXCLUSIVE            (0.9)
    shared   SHARED_LOW ≤ r ≤ 1 − SHARED_LOW   (0.3 ≤ r ≤ 0.7)
    mixed    anything else in between
    empty    ‖d_A‖ + ‖d_B‖ ≈ 0 (no decoder at all; r undefined)

The exclusive thresholds follow Minder et al. 2025 ("Robustly identifying concepts
introduced during chat fine-tuning using crosscoders"), who call latents with a relative
norm within 0.1 of either end model-specific; the shared band is wider than their 0.4–0.6
because a crosscoder's shared latents need not write with equal strength to both models.
For sources of equal width (two models at one layer), the cosine between a latent's two
decoders says whether a shared latent also writes the same *direction* in both.

Writes `diff.json` (counts, thresholds, per-latent r, decoder norms, cosine and class, the
latent lists), and `diff.png` (the histogram of r) to `RUN/diff/` or `--out`. Given the
two-source store (`sae-jax diff RUN DATA`), also a dashboard section in `OUT/dashboard/`
(`diff_dashboard`): each exclusive latent's top examples with each model's share of them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from sae_jax import files, plots
from sae_jax.errors import UserError

EXCLUSIVE = 0.1
SHARED_LOW = 0.3
EMPTY_NORM = 1e-6
CLASSES = ("A-only", "shared", "B-only", "mixed", "empty")
DIFF_JSON, DIFF_PNG = "diff.json", "diff.png"


def source_columns(widths: tuple[int, ...], a: int, b: int) -> tuple[tuple[int, int], ...]:
    """The row columns `((lo_A, hi_A), (lo_B, hi_B))` of sources `a` and `b`."""
    bounds = np.cumsum([0, *widths]).tolist()
    return (bounds[a], bounds[a + 1]), (bounds[b], bounds[b + 1])


def source_blocks(W_dec: np.ndarray, widths: tuple[int, ...], a: int, b: int):
    """The decoder blocks `(d_A (F, d_a), d_B (F, d_b))` of sources `a` and `b`."""
    (lo_a, hi_a), (lo_b, hi_b) = source_columns(widths, a, b)
    return W_dec[:, lo_a:hi_a], W_dec[:, lo_b:hi_b]


def relative_norms(d_a: np.ndarray, d_b: np.ndarray) -> np.ndarray:
    """r = ‖d_B‖ / (‖d_A‖ + ‖d_B‖) per latent; NaN where both decoders are ~0."""
    na, nb = np.linalg.norm(d_a, axis=1), np.linalg.norm(d_b, axis=1)
    total = na + nb
    return np.where(total > EMPTY_NORM, nb / np.maximum(total, EMPTY_NORM), np.nan)


def cross_cosines(d_a: np.ndarray, d_b: np.ndarray) -> np.ndarray | None:
    """cos(d_A, d_B) per latent (NaN where either is ~0), or None when the sources have
    different widths (different spaces: no direction to compare)."""
    if d_a.shape != d_b.shape:
        return None
    na, nb = np.linalg.norm(d_a, axis=1), np.linalg.norm(d_b, axis=1)
    ok = (na > EMPTY_NORM) & (nb > EMPTY_NORM)
    cos = (d_a * d_b).sum(1) / np.maximum(na * nb, EMPTY_NORM**2)
    return np.where(ok, cos, np.nan)


def classify(r: np.ndarray) -> np.ndarray:
    """Each latent's class (`CLASSES`) from its relative norm, by the module's thresholds."""
    out = np.full(r.shape, "mixed", dtype=object)
    out[r < EXCLUSIVE] = "A-only"
    out[r > 1 - EXCLUSIVE] = "B-only"
    out[(r >= SHARED_LOW) & (r <= 1 - SHARED_LOW)] = "shared"
    out[np.isnan(r)] = "empty"
    return out


def diff_decoders(W_dec: np.ndarray, widths: tuple[int, ...], names: list[str],
                  a: int = 0, b: int = 1) -> dict:
    """The diff of sources `a` and `b` of a crosscoder's decoder `W_dec (F, Σ widths)`."""
    d_a, d_b = source_blocks(np.asarray(W_dec, np.float64), widths, a, b)
    r = relative_norms(d_a, d_b)
    cos = cross_cosines(d_a, d_b)
    classes = classify(r)
    lists = {c: np.flatnonzero(classes == c).tolist() for c in CLASSES}
    return {
        "source_a": names[a], "source_b": names[b], "width": int(W_dec.shape[0]),
        "thresholds": {"exclusive": EXCLUSIVE, "shared": [SHARED_LOW, 1 - SHARED_LOW]},
        "counts": {c: len(v) for c, v in lists.items()},
        "latents": lists,
        "source_columns": [list(c) for c in source_columns(widths, a, b)],
        "relative_norm": r.tolist(),
        "decoder_norm_a": np.linalg.norm(d_a, axis=1).tolist(),
        "decoder_norm_b": np.linalg.norm(d_b, axis=1).tolist(),
        "cosine": None if cos is None else cos.tolist(),
        "median_shared_cosine": (None if cos is None or not lists["shared"] else
                                 float(np.nanmedian(cos[lists["shared"]]))),
    }


def plot_diff(result: dict) -> bytes:
    """Histogram of the relative decoder norms, thresholds marked."""
    fig, (ax,) = plots.figure(6, 3.5)
    r = np.asarray(result["relative_norm"], float)
    ax.hist(r[~np.isnan(r)], bins=50, range=(0, 1), color="#4C72B0")
    for x in (EXCLUSIVE, SHARED_LOW, 1 - SHARED_LOW, 1 - EXCLUSIVE):
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"relative decoder norm ‖d_{result['source_b']}‖ / "
                  f"(‖d_{result['source_a']}‖ + ‖d_{result['source_b']}‖)")
    ax.set_ylabel("latents")
    c = result["counts"]
    ax.set_title(f"{c['A-only']} {result['source_a']}-only, {c['shared']} shared, "
                 f"{c['B-only']} {result['source_b']}-only, {c['mixed']} mixed")
    return plots.png(fig)


def source_names(data_dir: str, n: int) -> list[str]:
    """The store's source names if it is still readable, else A, B, C, ..."""
    from sae_jax.data.store import open_store

    try:
        sources = open_store(data_dir).sources
    except UserError:
        sources = None
    if sources is None or len(sources) != n:
        return [chr(ord("A") + i) for i in range(n)]
    return [str(s["name"]) for s in sources]


def diff_run(run_dir: str, a: str | None = None, b: str | None = None) -> dict:
    """Loads a crosscoder run and diffs two of its sources (default: the first two), given
    by name or index."""
    import sae_jax
    from sae_jax import saes
    from sae_jax.rundir import read_run

    info = read_run(run_dir)
    if not saes.get(info.config).crosscoder:
        raise UserError(f"{run_dir} is a {info.config.arch} run; diff needs a crosscoder "
                        "(arch=crosscoder, crosscoder_topk or crosscoder_batchtopk)")
    if info.config.transcoder:
        raise UserError(f"{run_dir} is a cross-layer transcoder ({info.config.arch}); diff "
                        "compares the sources of a crosscoder")
    widths = tuple(info.config.sources or (info.d_in,))
    if len(widths) < 2:
        raise UserError(f"{run_dir} was trained on one source; diff needs a multi-source store "
                        "(`sae-jax import A B DATA_DIR`)")
    names = source_names(info.data_dir, len(widths))
    pick = [_source_index(x, names, default) for x, default in ((a, 0), (b, 1))]
    if pick[0] == pick[1]:
        raise UserError("--a and --b name the same source")
    W_dec = np.asarray(sae_jax.load(run_dir).params["W_dec"])
    return {"run": str(run_dir), **diff_decoders(W_dec, widths, names, *pick)}


def _source_index(which: str | None, names: list[str], default: int) -> int:
    if which is None:
        return default
    if which in names:
        return names.index(which)
    if which.isdigit() and int(which) < len(names):
        return int(which)
    raise UserError(f"no source {which!r}; the run's sources are {', '.join(names)}")


def add_arguments(parser) -> None:
    """`sae-jax diff RUN [DATA] [--a NAME] [--b NAME] [--out DIR] [--max-latents N]`."""
    from sae_jax.analysis.diff_dashboard import DEFAULT_MAX_LATENTS

    parser.add_argument("run_dir", help="a crosscoder run directory")
    parser.add_argument("data_dir", nargs="?", default=None,
                        help="its two-source store: also write the dashboard section "
                             "(OUT/dashboard/index.html) with each exclusive latent's examples")
    parser.add_argument("--a", default=None, help="source A, by name or index (default: first)")
    parser.add_argument("--b", default=None, help="source B, by name or index (default: second)")
    parser.add_argument("--out", default=None, help="where to write diff.json and diff.png "
                                                    "(default: RUN/diff)")
    parser.add_argument("--max-latents", type=int, default=DEFAULT_MAX_LATENTS,
                        help="exclusive latents shown per class, the most exclusive first "
                             f"(default {DEFAULT_MAX_LATENTS})")
    parser.add_argument("--examples", type=int, default=10,
                        help="top examples per shown latent (default 10)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> dict:
    t0 = time.perf_counter()
    if args.data_dir is not None:  # refuse bad dashboard arguments before writing anything
        from sae_jax.data.store import open_store

        for name, value in (("--max-latents", args.max_latents), ("--examples", args.examples),
                            ("--batch-size", args.batch_size)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        open_store(args.data_dir)
    result = diff_run(args.run_dir, args.a, args.b)
    out = str(args.out or files.join(args.run_dir, "diff")).rstrip("/")
    if not files.is_remote(out):
        if Path(out).exists() and not Path(out).is_dir():
            raise UserError(f"--out {out} is a file, not a directory")
        Path(out).mkdir(parents=True, exist_ok=True)
    png = plot_diff(result)
    files.write_bytes(files.join(out, DIFF_JSON), (files.strict_json(result) + "\n").encode())
    files.write_bytes(files.join(out, DIFF_PNG), png)
    site = None
    if args.data_dir is not None:
        import sae_jax
        from sae_jax.analysis.diff_dashboard import SITE_DIR, write_diff_site

        site = write_diff_site(sae_jax.load(args.run_dir), result, args.data_dir,
                               files.join(out, SITE_DIR), png, max_latents=args.max_latents,
                               top_k=args.examples, batch_size=args.batch_size,
                               progress=not args.quiet)
        print(f"diff dashboard: open {site['index']} in a browser", file=sys.stderr)
    c = result["counts"]
    print(f"{result['source_a']}-only {c['A-only']}, shared {c['shared']}, "
          f"{result['source_b']}-only {c['B-only']}, mixed {c['mixed']}, empty {c['empty']}",
          file=sys.stderr)
    return {"run": str(args.run_dir), "source_a": result["source_a"],
            "source_b": result["source_b"], "counts": c,
            "median_shared_cosine": result["median_shared_cosine"],
            "out": {"json": files.join(out, DIFF_JSON), "png": files.join(out, DIFF_PNG)},
            "dashboard": site,
            "seconds": round(time.perf_counter() - t0, 2)}
