"""`sae-jax evals RUN... DATA [--suite core|probing|absorption|all] [--out DIR]`: the
evaluation suites of several runs (seeds) with confidence intervals, random baselines and
PW-MCC.

`eval` is the fast core of one run; `evals` is what a comparison needs. RUN is a run or a
sweep directory (its members, from `sweep.json`, e.g. a seed sweep `train ... seed=0,1,2`).
Every run, and each of its random baselines (`baselines.baseline_saes`: a random-direction
TopK SAE at the run's L0 and the architecture's fresh init, seeded by the run's index), goes
through every suite (`suite(sae, store, args) -> {"metrics", "higher_is_better", "detail"}`).
Per metric the report holds the per-run values, their mean ± 95 % CI (`seed_stats`), each
baseline's values and the trained SAE's margins over it (positive = trained is better) with
their own mean ± CI; and `pw_mcc`, the mean one-to-one decoder cosine over all pairs of runs.
The runs must share width, d_in, d_out and training store.

Written to OUT (default RUN/evals for one RUN): `evals.json` (strict JSON), one PNG per
suite (`evals_<suite>.png`: each metric's mean and CI for the trained runs and the baselines,
per-run values as dots). `sae-jax dashboard RUN` shows the table when RUN/evals/evals.json
exists, or the evals of the sweep RUN belongs to (`read_evals`).
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np

from sae_jax import files, plots
from sae_jax.analysis import downstream, seed_stats
from sae_jax.errors import UserError

EVALS_DIR = "evals"
EVALS_FILE = "evals.json"
SUITE_MODULES = {"core": "sae_jax.analysis.core_metrics",
                 "probing": "sae_jax.analysis.probing",
                 "absorption": "sae_jax.analysis.absorption"}
"""suite name -> module whose `suite(sae, store, args)` runs it."""
SUITE_CHOICES = (*SUITE_MODULES, "all")
PANEL_COLUMNS = 4


def load_suite(name: str):
    """The suite function of `name` (its module is imported only when it runs)."""
    return importlib.import_module(SUITE_MODULES[name]).suite


def expand_runs(paths: list[str]) -> list[tuple[str, str]]:
    """`(name, run_dir)` of every run: a run directory is itself (named after its folder), a
    sweep directory its members in `sweep.json` order (named as in the sweep)."""
    from sae_jax.rundir import CONFIG_FILE
    from sae_jax.training.sweep import SWEEP_FILE

    runs = []
    for path in paths:
        path = str(path).rstrip("/")
        if files.exists(files.join(path, CONFIG_FILE)):
            runs.append((Path(path).name, path))
        elif files.exists(files.join(path, SWEEP_FILE)):
            record = files.read_json(files.join(path, SWEEP_FILE), "")
            runs += [(m["name"], files.join(path, m["name"])) for m in record["members"]]
        else:
            raise UserError(f"{path} is neither a run ({CONFIG_FILE}) nor a sweep directory "
                            f"({SWEEP_FILE})")
    names = [n for n, _ in runs]
    if len(set(names)) < len(names):  # e.g. two sweeps with the same member names
        runs = [(d, d) for _, d in runs]
    if len({d for _, d in runs}) < len(runs):
        raise UserError("a run is listed twice")
    return runs


def check_comparable(runs: list[tuple[str, str]], infos: list) -> None:
    """Refuses runs whose numbers do not compare: another width, d_in, d_out or store."""
    def shape(info):
        return {"width": info.config.width, "d_in": info.d_in, "d_out": info.d_out}

    first_name, first = runs[0][0], infos[0]
    for (name, _), info in zip(runs[1:], infos[1:]):
        for key, value in shape(info).items():
            if value != shape(first)[key]:
                raise UserError(f"runs {first_name} and {name} differ in {key} "
                                f"({shape(first)[key]} vs {value}): evals compares runs of "
                                "one width, d_in and store")
        if None not in (info.store_id, first.store_id) and info.store_id != first.store_id:
            raise UserError(f"runs {first_name} and {name} were trained on different stores "
                            f"({first.data_dir} vs {info.data_dir}): evals compares runs of "
                            "one width, d_in and store")


def score(sae, store, suites: dict, args) -> tuple[dict, dict, dict]:
    """`(metrics, higher_is_better, detail)` of one SAE over every suite; a metric name that
    two suites share is kept apart as `suite.metric`."""
    metrics, higher, detail, owner = {}, {}, {}, {}
    for name, suite in suites.items():
        out = suite(sae, store, args)
        for key, value in out["metrics"].items():
            new = key if key not in metrics else f"{name}.{key}"
            metrics[new], owner[new] = value, name
            if key in out.get("higher_is_better", {}):
                higher[new] = bool(out["higher_is_better"][key])
        detail[name] = out.get("detail", {})
    return metrics, higher, detail | {"suite_of": owner}


def evaluate_runs(paths: list[str], data_dir: str, suite_names: list[str], args,
                  progress: bool = False) -> dict:
    """The evals report (module docstring) of the runs in `paths` on the store `data_dir`."""
    from tqdm import tqdm

    from sae_jax.data.store import open_store
    from sae_jax.rundir import read_run
    from sae_jax.sae import load

    suites = {n: load_suite(n) for n in suite_names}
    from sae_jax.analysis import baselines, core_metrics

    runs = expand_runs(paths)
    infos = [read_run(d) for _, d in runs]
    check_comparable(runs, infos)
    store = open_store(data_dir)
    row_width = infos[0].d_in + (infos[0].d_out or 0) * bool(infos[0].config.transcoder)
    if store.d_in != row_width:
        raise UserError(f"store {data_dir} has d_in={store.d_in}, but the runs were trained "
                        f"on d_in={row_width}")
    seed = getattr(args, "seed", 0)
    trained, base, margin, detail, decoders, higher, listed = [], {}, {}, {}, [], {}, []
    bar = tqdm(total=len(runs) * 3, desc="evals", unit="SAE", disable=not progress,
               dynamic_ncols=True)
    with bar:
        for i, (name, run_dir) in enumerate(runs):
            sae = load(run_dir)
            metrics, hib, detail[name] = score(sae, store, suites, args)
            if "core" in suites:  # the trained run's own (a baseline has no training)
                metrics["decoder_init_cos"] = core_metrics.decoder_init_cosine(sae, run_dir)
            bar.update()
            higher |= hib
            trained.append(metrics)
            decoders.append(np.asarray(sae.params["W_dec"]))
            l0 = metrics.get("l0") or float(sae.config.k)
            scored = {}
            for b_name, b_sae in baselines.baseline_saes(sae, l0, seed=seed + i).items():
                scored[b_name] = score(b_sae, store, suites, args)[0]
                base.setdefault(b_name, []).append(scored[b_name])
                bar.update()
            for b_name, m in baselines.margins(metrics, scored, hib).items():
                margin.setdefault(b_name, []).append(m)
            listed.append({"name": name, "run_dir": str(run_dir), "step": sae.step,
                           "seed": sae.config.seed, "data_seed": sae.config.data_seed})
    table = seed_stats.across_runs(trained)
    base_table = {b: seed_stats.across_runs(v) for b, v in base.items()}
    margin_table = {b: seed_stats.across_runs(v) for b, v in margin.items()}
    for key, entry in table.items():
        entry["suite"] = detail[runs[0][0]]["suite_of"].get(key)
        entry["higher_is_better"] = higher.get(key)
        entry["baselines"] = {b: t[key] for b, t in base_table.items() if key in t}
        entry["margins"] = {b: t[key] for b, t in margin_table.items() if key in t}
    return {"runs": listed, "n_runs": len(runs), "data_dir": str(data_dir),
            "suites": list(suite_names), "ci_level": seed_stats.CI_LEVEL,
            "baseline_seeds": f"run i's baselines use seed {seed} + i",
            "metrics": table, "pw_mcc": seed_stats.pw_mcc(decoders, [n for n, _ in runs]),
            "detail": detail}


def _bar(entry: dict) -> tuple[float, float]:
    """`(mean, CI half-width)` as plotted (NaN / 0 where missing)."""
    mean = entry.get("mean")
    return (math.nan if mean is None else mean), (entry.get("half_width") or 0.0)


def plot_suite(report: dict, suite: str) -> bytes | None:
    """One panel per metric of `suite` (and PW-MCC on the first suite's figure): the trained
    runs' mean and each baseline's as bars with 95 % CI error bars, per-run values as dots.
    None if the suite reported no metric."""
    names = [k for k, e in report["metrics"].items() if e.get("suite") == suite]
    with_mcc = suite == report["suites"][0] and report["pw_mcc"]["n"] > 0
    n = len(names) + with_mcc
    if n == 0:
        return None
    cols = min(PANEL_COLUMNS, n)
    rows = math.ceil(n / cols)
    fig, _ = plots.figure(3.2 * cols, 2.8 * rows, n_axes=0)
    for i, key in enumerate(names + ["pw_mcc"] * with_mcc):
        ax = fig.add_subplot(rows, cols, i + 1)
        if key == "pw_mcc":
            entries = {"pairs of runs": report["pw_mcc"]}
            dots = {"pairs of runs": [p["value"] for p in report["pw_mcc"]["pairs"]]}
            title = "pw_mcc \u2191"
        else:
            entry = report["metrics"][key]
            entries = {"trained": entry, **entry["baselines"]}
            dots = {k: e["per_run"] for k, e in entries.items()}
            arrow = {True: " \u2191", False: " \u2193"}.get(entry["higher_is_better"], "")
            title = key + arrow
        labels = list(entries)
        means, halves = zip(*(_bar(entries[k]) for k in labels))
        x = np.arange(len(labels))
        ax.bar(x, means, yerr=halves, capsize=4, color=["tab:blue"] + ["tab:gray"] * (
            len(labels) - 1), alpha=0.8)
        for j, k in enumerate(labels):
            v = [d for d in dots[k] if d is not None]
            ax.plot(np.full(len(v), x[j]), v, "k.", markersize=4)
        ax.set_xticks(x, [lbl.replace("random_", "random\n") for lbl in labels], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"evals: {suite} suite, {report['n_runs']} runs, mean \u00b1 95% CI")
    return plots.png(fig)


def write_report(report: dict, out_dir) -> dict:
    """Writes OUT/evals.json and one PNG per suite; returns their paths."""
    out = str(out_dir).rstrip("/")
    files.ensure_writable_dir(out, "the evals results")
    pngs = []
    for suite in report["suites"]:
        png = plot_suite(report, suite)
        if png is not None:
            pngs.append(files.join(out, f"evals_{suite}.png"))
            files.write_bytes(pngs[-1], png)
    files.write_text(files.join(out, EVALS_FILE), files.strict_json(report, indent=1) + "\n")
    return {"json": files.join(out, EVALS_FILE), "pngs": pngs}


def read_evals(run_dir) -> dict | None:
    """The evals report to show with a run: RUN/evals/evals.json, else that of the sweep the
    run is a member of (SWEEP/evals/evals.json listing it); None if there is none."""
    run_dir = str(run_dir).rstrip("/")
    candidates = [files.join(run_dir, EVALS_DIR, EVALS_FILE)]
    if not files.is_remote(run_dir):
        candidates.append(str(Path(run_dir).absolute().parent / EVALS_DIR / EVALS_FILE))
    for i, path in enumerate(candidates):
        if files.exists(path):
            report = files.read_json(path, "")
            if i == 0 or Path(run_dir).name in {r["name"] for r in report.get("runs", [])}:
                return report
    return None


def summary(report: dict, written: dict, out: str) -> dict:
    """The command's JSON line: every metric's mean and CI, and PW-MCC."""
    brief = {k: {"mean": e["mean"], "ci_low": e["ci_low"], "ci_high": e["ci_high"]}
             for k, e in report["metrics"].items()}
    mcc = report["pw_mcc"]
    return {"out": out, **written, "n_runs": report["n_runs"], "suites": report["suites"],
            "metrics": brief,
            "pw_mcc": {"mean": mcc["mean"], "ci_low": mcc["ci_low"], "ci_high": mcc["ci_high"]}}


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run or sweep directories (a sweep stands for its members)")
    parser.add_argument("data_dir", metavar="DATA", help="the store to evaluate on")
    parser.add_argument("--suite", choices=SUITE_CHOICES, default="all",
                        help="which suites to run (default: all)")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write evals.json and the PNGs (default: RUN/evals for "
                             "one RUN; needed for several)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random baselines (run i uses seed + i)")
    parser.add_argument("--batch-size", type=int, default=4096)
    downstream.add_arguments(parser)  # --fidelity-sequences, --corpus, --lm-batch
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from sae_jax.analysis import probing

    probing.add_arguments(parser)  # --probe-rows, read by the probing and absorption suites


def run(args) -> dict:
    if len(args.runs) > 1 and not args.out:
        raise UserError("several RUNs need --out DIR for the evals results")
    if args.batch_size < 1 or args.lm_batch < 1:
        raise UserError("--batch-size and --lm-batch must be at least 1")
    out = args.out or files.join(str(args.runs[0]).rstrip("/"), EVALS_DIR)
    files.ensure_writable_dir(out, "the evals results")  # before hours of work, not after
    suites = list(SUITE_MODULES) if args.suite == "all" else [args.suite]
    report = evaluate_runs(args.runs, args.data_dir, suites, args, progress=not args.quiet)
    written = write_report(report, out)
    print(f"evals: {written['json']}", file=sys.stderr)
    return summary(report, written, out)
