"""`sae-jax prune RUN OUT`: a smaller SAE for cheaper feature extraction, as a new run.

Drops dead latents, near-duplicates and, with `--width W`, the latents that contribute least
to the reconstruction (`release/pruning.py` says how each is chosen), but never raises the
held-out FVU by more than `--fvu-budget` (absolute; measured on the same held-out rows
`sae-jax eval` uses; the cut that is kept is measured, not estimated). OUT is a run like any
other (`sae_jax.load`, eval, export, dashboard): `config.json` with the new width, a params-only
checkpoint at the source's step, the source's `metrics.jsonl` (the training that produced
these params), its `feature_catalog.json` with ids mapped to the new indices, and
`pruned_from.json` (`new_to_old` ids, every dropped latent with its reason, the report).

The report (last stdout line, JSON) gives width, counts per reason, held-out FVU and L0,
downstream fidelity (MiniLM stores) or loss recovered (causal-LM stores) before and after,
and the encode speedup measured in the same process (`bench.bench_encode` on the same
held-out rows, old and new alternating, best of `--bench-rounds`; `encode_speedup`).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from sae_jax import files
from sae_jax.analysis.catalog import find_catalog, write_catalog
from sae_jax.analysis.core_metrics import DUPLICATE_COSINE, eval_sums, row_metrics
from sae_jax.analysis.downstream import downstream
from sae_jax.analysis.evaluate import evaluate
from sae_jax.data.loader import stats_sample
from sae_jax.data.store import RowSpan, open_store
from sae_jax.errors import UserError
from sae_jax.planning.bench import bench_encode
from sae_jax.release import pruning
from sae_jax.rundir import PRUNED_FROM, read_run
from sae_jax.sae import SAE, load
from sae_jax.saelens.import_sae import check_new_run_dir, write_params_run
from sae_jax.saes import clt
from sae_jax.training.metrics import METRICS_FILE

BENCH_ROWS, BENCH_REPEAT, BENCH_BEST_OF = 4096, 3, 5


def _open_data(run_dir, info, data_dir: str | None):
    """The run's store (or `data_dir`), checked against the run."""
    data_dir = data_dir or info.data_dir
    if not data_dir:
        raise UserError(f"run {run_dir} records no training store (an imported SAE?); pass "
                        "--data DATA_DIR")
    store = open_store(data_dir)
    if info.store_id is not None and store.id is not None and store.id != info.store_id:
        raise UserError(f"run {run_dir} was trained on store {info.store_id}, but "
                        f"{data_dir} is store {store.id}")
    width = info.d_in + (info.d_out if info.config.transcoder else 0)
    if store.d_in != width:
        raise UserError(f"store {data_dir} has d_in={store.d_in}, but the SAE in {run_dir} "
                        f"reads rows of width {width}")
    return store


def _check_options(args, sae: SAE) -> None:
    if not 0 < args.duplicate_cosine <= 1:
        raise UserError(f"--duplicate-cosine must be in (0, 1], got {args.duplicate_cosine}")
    if not args.fvu_budget >= 0:
        raise UserError(f"--fvu-budget must be >= 0, got {args.fvu_budget}")
    for name in ("sample_rows", "bench_rounds", "train_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.fidelity_sequences < 0:
        raise UserError("--fidelity-sequences must be >= 0 (0: skip)")
    if args.width is None:
        return
    if args.width > sae.width:
        raise UserError(f"--width {args.width} is larger than the SAE's width {sae.width}")
    floor = pruning.min_width(sae.config)
    if args.width < floor:
        raise UserError(f"--width {args.width} is below the fewest latents a "
                        f"{sae.config.arch} SAE can keep ({floor}: each row takes its top "
                        f"k={sae.config.k})")


def _even_rows(span, n: int) -> np.ndarray:
    """About `n` rows spread over `span` (`loader.stats_sample` blocks, thinned evenly)."""
    sample = stats_sample(span)
    return sample[np.unique(np.linspace(0, len(sample) - 1, min(n, len(sample))).astype(int))]


def _pruned_sae(sae: SAE, keep: np.ndarray) -> SAE:
    cfg = pruning.pruned_config(sae.config, keep)
    return SAE(cfg, pruning.slice_latents(sae.params, keep, sae.config), sae.input_scale,
               sae.step, sae.target_scale)


def _masked(sae: SAE, removed) -> SAE:
    """`sae` with latents `removed` silenced at the old shapes (`pruning.mask_latents`)."""
    return dataclasses.replace(sae, params=pruning.mask_latents(sae.params, removed))


def _candidates(sae: SAE, fires: np.ndarray, args, train) -> list[dict]:
    """Every latent `prune` would drop without a budget, in removal order."""
    dead = pruning.dead_latents(fires)
    alive = np.flatnonzero(fires > 0)
    dups = pruning.duplicate_latents(sae.params["W_dec"], fires, alive, args.duplicate_cosine)
    contribution = {}
    if args.width is not None:  # measured with dead and duplicates already gone (masked)
        gone = [*dead, *(d["id"] for d in dups)]
        masked = _masked(sae, gone)
        delta = pruning.removal_sse(masked, _even_rows(train, args.sample_rows))
        rest = pruning.kept_latents(sae.width, gone)
        contribution = dict(zip(rest.tolist(), delta[rest].tolist()))
    return pruning.removal_order(dead, dups, contribution, args.width, sae.width,
                                 pruning.min_width(sae.config))


def _downstream(old: SAE, new: SAE, store, args) -> dict:
    """Fidelity (MiniLM) or loss recovered (causal LM) of both SAEs, as eval measures it;
    a note instead for a store no model can be re-run for."""
    from sae_jax.lm.hooks import check_model_store

    if args.fidelity_sequences == 0:
        return {"downstream_note": "skipped: --fidelity-sequences 0"}
    try:
        check_model_store(store, "downstream fidelity")
    except UserError as e:
        return {"downstream_note": f"skipped: {e}"}
    ns = SimpleNamespace(fidelity_sequences=args.fidelity_sequences, corpus=args.corpus)
    before, after = downstream(old, store, ns), downstream(new, store, ns)
    out = {"downstream_before": before, "downstream_after": after}
    if "fidelity" in before:
        out["fidelity_recovered_before"], out["fidelity_recovered_after"] = (
            (d["fidelity"] or {}).get("fidelity_recovered") for d in (before, after))
    if "loss_recovered" in before:
        out["loss_recovered_before"] = before["loss_recovered"]
        out["loss_recovered_after"] = after["loss_recovered"]
    return out


def encode_speedup(old: SAE, new: SAE, rows: np.ndarray, rounds: int) -> dict:
    """Feature-extraction throughput of both SAEs on the same scaled rows: `rounds` rounds,
    old then new, each `bench.bench_encode` (compiled first; the fastest of `BENCH_BEST_OF`
    means of `BENCH_REPEAT` calls), and the best of each over the rounds (alternating, so
    a load that comes and goes on a shared machine hits both)."""
    x = np.asarray(old.split_rows(rows)[0], np.float32) * old.input_multiplier
    best = {"before": 0.0, "after": 0.0}
    for _ in range(rounds):
        for key, sae in (("before", old), ("after", new)):
            got = bench_encode(sae.config, sae.d_in, sae.params, x, BENCH_REPEAT, BENCH_BEST_OF)
            best[key] = max(best[key], got["encode_tokens_per_s"])
    return {"rows": len(x), "rounds": rounds,
            "encode_tokens_per_s_before": best["before"],
            "encode_tokens_per_s_after": best["after"],
            "speedup": best["after"] / best["before"]}


def _write_run(out: Path, run_dir, info, new: SAE, keep) -> list[str]:
    """OUT as a run: config + params, the source's metrics and its catalog with ids mapped."""
    written = write_params_run(out, dataclasses.replace(info, config=new.config), new.params,
                               new.step)
    metrics = Path(run_dir) / METRICS_FILE
    if metrics.is_file():
        shutil.copyfile(metrics, out / METRICS_FILE)
        written.append(METRICS_FILE)
    catalog = find_catalog(run_dir)
    if catalog is not None:
        mapped = pruning.map_catalog(catalog, keep, str(out.absolute()),
                                     str(Path(run_dir).absolute()))
        written.append(Path(write_catalog(mapped, out)).name)
    return [*written, PRUNED_FROM]


def _write_record(out: Path, record: dict) -> None:
    files.write_text(out / PRUNED_FROM, files.strict_json(record, indent=1) + "\n")


def choose_cut(sae: SAE, order: list[dict], heldout, budget: float):
    """The longest prefix of `order` whose removal raises the held-out FVU by at most
    `budget` (`pruning.largest_within_budget` on masks, then the sliced cut measured).

    Returns:
      `(m, cut, before, after)`: how many of `order` go, the pruned SAE, and `evaluate` of
      the SAE and of the cut on `heldout`.
    """
    before = evaluate(sae, heldout)

    def increase(m: int) -> float:
        masked = _masked(sae, [c["id"] for c in order[:m]])  # the FVU alone: one pass
        return row_metrics(eval_sums(masked, heldout), masked.d_out)["fvu"] - before["fvu"]

    m = pruning.largest_within_budget(len(order), increase, budget)
    while True:  # the cut itself, sliced; one fewer if rounding took it over the budget
        cut = _pruned_sae(sae, pruning.kept_latents(sae.width, [c["id"] for c in order[:m]]))
        after = evaluate(cut, heldout)
        if m == 0 or after["fvu"] - before["fvu"] <= budget:
            return m, cut, before, after
        m -= 1


def prune(args) -> dict:
    """`sae-jax prune` (module docstring); `args` as `add_arguments` parses them."""
    t0 = time.perf_counter()
    out = Path(args.out_dir)
    if files.is_remote(args.out_dir):
        raise UserError("prune's OUT must be a local directory")
    check_new_run_dir(out)
    info = read_run(args.run_dir)
    if clt.is_clt(info.config):
        raise UserError(f"prune does not handle cross-layer transcoders yet ({args.run_dir} is "
                        f"arch={info.config.arch}: its latents are interleaved by layer)")
    sae = load(args.run_dir)
    _check_options(args, sae)
    store = _open_data(args.run_dir, info, args.data)
    train, heldout = store.split(sae.config.holdout)
    if args.train_rows is not None:
        train = RowSpan(train.store, train.start, min(train.stop, train.start + args.train_rows))
    fires = eval_sums(sae, train)["fires"]
    order = _candidates(sae, fires, args, train)
    m, cut, before, after = choose_cut(sae, order, heldout, args.fvu_budget)
    removed = order[:m]
    keep = pruning.kept_latents(sae.width, [c["id"] for c in removed])
    files_written = _write_run(out, args.run_dir, info, cut, keep)
    record = {"run": str(Path(args.run_dir).absolute()), "step": sae.step,
              "new_to_old": keep.tolist(), "dropped": removed}
    _write_record(out, record)
    new = load(out)
    if not all(np.array_equal(new.params[k], cut.params[k]) for k in cut.params):
        raise AssertionError(f"the run written to {out} does not hold the pruned params")

    result = {
        "run": record["run"], "out": str(out.absolute()), "step": sae.step,
        "arch": sae.config.arch,
        "width_before": sae.width, "width_after": new.width, "width_target": args.width,
        "dropped": {r: sum(c["reason"] == r for c in removed) for r in pruning.REASONS},
        "candidates": {r: sum(c["reason"] == r for c in order) for r in pruning.REASONS},
        "stopped_by_budget": m < len(order),
        "fvu_budget": args.fvu_budget, "heldout_rows": before["n_rows"],
        "fvu_before": before["fvu"], "fvu_after": after["fvu"],
        "fvu_increase": after["fvu"] - before["fvu"],
        "l0_before": before["l0"], "l0_after": after["l0"],
        "train_rows": len(train),
        **_downstream(sae, new, store, args),
        "extraction": encode_speedup(sae, new, heldout.read(0, min(len(heldout), BENCH_ROWS)),
                                     args.bench_rounds),
        "files": files_written,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _write_record(out, {**record, "report": result})
    return result


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="the trained run to prune")
    parser.add_argument("out_dir", help="new run directory for the pruned SAE (new, or empty)")
    parser.add_argument("--data", default=None, metavar="DATA_DIR",
                        help="the store to measure on (default: the one the run was trained on)")
    parser.add_argument("--duplicate-cosine", type=float, default=DUPLICATE_COSINE,
                        metavar="C",
                        help="decoder cosine at or above which two latents are duplicates; "
                             f"the more frequent is kept (default {DUPLICATE_COSINE:g})")
    parser.add_argument("--width", type=int, default=None, metavar="W",
                        help="also drop the least-contributing latents down to W")
    parser.add_argument("--fvu-budget", type=float, default=0.01, metavar="B",
                        help="the most the held-out FVU may rise (absolute; default 0.01): "
                             "pruning stops before it is exceeded")
    parser.add_argument("--train-rows", type=int, default=None, metavar="N",
                        help="training rows scanned for dead latents (default: all)")
    parser.add_argument("--sample-rows", type=int, default=16384, metavar="N",
                        help="training rows the width contributions are measured on "
                             "(default 16384)")
    parser.add_argument("--fidelity-sequences", type=int, default=32, metavar="N",
                        help="held-out sequences for downstream fidelity or loss recovered "
                             "(default 32; 0 skips it)")
    parser.add_argument("--corpus", nargs="+", metavar="PATH",
                        help="the corpus the store was harvested from, if not the default")
    parser.add_argument("--bench-rounds", type=int, default=3, metavar="N",
                        help="alternating timing rounds of old and new encode (default 3)")


def run(args) -> dict:
    result = prune(args)
    print(f"prune: width {result['width_before']} -> {result['width_after']} "
          f"(dead {result['dropped']['dead']}, duplicate {result['dropped']['duplicate']}, "
          f"width {result['dropped']['width']}); held-out FVU {result['fvu_before']:.4f} -> "
          f"{result['fvu_after']:.4f} (budget +{result['fvu_budget']:g}); encode "
          f"{result['extraction']['speedup']:.2f}x faster", file=sys.stderr)
    return result
