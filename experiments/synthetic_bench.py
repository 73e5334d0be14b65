"""Ground-truth benchmark: how well each SAE architecture recovers known, structured features.

    python experiments/synthetic_bench.py [--out runs/synthetic_bench] [--seeds 0,1,2]
                                          [--archs relu,jumprelu,topk,batchtopk,matryoshka]
                                          [--small]

Data (`sae_jax.data.structured`, in the spirit of SynthSAEBench): N = 256 unit atoms in
d = 64, true L0 = 5; Zipf-like frequencies (exponent 0.7); 16 parents with 4 mutually
exclusive children each (a child fires only with its parent: the cause of absorption);
16 groups of 4 co-firing features (copula ρ = 0.7). One dataset (structure seed 0): 2M
training rows written to .npy and brought in with `sae-jax import`, and 65 536 held-out rows
of another stream whose true codes are kept for scoring.

Training: one `sae-jax train DATA RUN --sweep FILE seed=0,1,2` (the real entry point; one
pass trains the 5 architectures × 3 seeds on the same batches, so the seeds differ in
their initialisation), width N = 256,
2000 steps × 1024 rows. TopK, BatchTopK and Matryoshka use k = 5 (the true L0); ReLU (L1)
and JumpReLU (L0 penalty) have the sparsity_coeff of `SPARSITY` (JumpReLU's L0 lands near
5; ReLU's L1 cannot get there without losing the features, so it keeps its default).
`dead_tokens` is 250k (`--dead-tokens`; an eighth of a run): a latent silent that long
counts as dead and feeds AuxK (TopK family). The library default (a window meant for runs
of billions of tokens) would never mark a latent dead in a 2M-token run. Everything else
is the architecture's default.

Scoring (`sae_jax.analysis.ground_truth.score_sae`, on the held-out rows): MCC (one-to-one
mean decoder cosine with the true atoms), F1 of each true feature's assigned latent firing,
atoms recovered at cos ≥ 0.9, FVU and L0. The table gives mean ± 95 % CI across seeds
(`seed_stats.across_runs`: Student t, n − 1 degrees of freedom), the seeds' PW-MCC
(`seed_stats.pw_mcc`: mean one-to-one decoder cosine between every two seeds), MCC of a
random unit dictionary as the floor, and MCC / F1 by kind of feature (parent, child,
correlated, independent).

Random baselines: each trained SAE's two (`baselines.baseline_saes(sae, its held-out L0,
its seed)`: `random_directions`, TopK over random unit directions with k = that L0;
`random_init`, the architecture's fresh init) are scored by the same `score_sae` on the
same held-out rows, and the trained SAE's margin over each (`baselines.margins`: positive
= trained better; FVU's is baseline − trained) on MCC, F1, atoms recovered and FVU. The
second table gives, per architecture and baseline, the baseline's values and the margins,
mean ± 95 % CI across the seeds.
Writes `OUT/bench.json` and `OUT/bench.md`; prints the table and, last, one JSON line.

`--small` (for tests): N = 64 atoms in d = 32, true L0 3, 32k rows, 300 steps × 256.

Result (2-core CPU shared with other jobs, 1 device): see README "Synthetic benchmark".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import sae_jax
from sae_jax.analysis.baselines import baseline_saes, margins
from sae_jax.analysis.ground_truth import mcc, score_sae
from sae_jax.analysis.seed_stats import across_runs, pw_mcc
from sae_jax.data.structured import (
    HELDOUT_STREAM,
    StructuredSpec,
    feature_kinds,
    make_structure,
    sample,
    structure_stats,
    write_rows,
)

ARCHS = ("relu", "jumprelu", "topk", "batchtopk", "matryoshka")
SPARSITY = {"relu": 2.0, "jumprelu": 0.7}
"""sparsity_coeff of the penalised architectures. JumpReLU's L0 penalty at 0.7 lands at
L0 ≈ 4.7 (true L0 5). ReLU keeps its default 2.0 (L0 ≈ 10): on this data (2M tokens) L1
buys a lower L0 only with worse recovery: coefficient 2 / 3 / 4 / 5.5 gave L0 9.8 / 8.8 /
7.9 / 6.5 and MCC 0.82 / 0.78 / 0.73 / 0.62 (seed 0)."""
METRICS = ("mcc", "f1", "atoms_recovered", "fvu", "l0")
KINDS = ("parent", "child", "correlated", "independent")
HIGHER_IS_BETTER = {"mcc": True, "f1": True, "atoms_recovered": True, "fvu": False}
"""The ground-truth scores a random baseline is compared on, and which way is better."""
BASELINES = ("random_directions", "random_init")
MARGIN_COLUMNS = ("mcc", "f1", "fvu")


@dataclasses.dataclass(frozen=True)
class Setting:
    """The sizes of one benchmark (the full one, or `--small`)."""

    spec: StructuredSpec
    train_rows: int
    heldout_rows: int
    steps: int
    batch_size: int


FULL = Setting(StructuredSpec(), train_rows=2_000_000, heldout_rows=65_536, steps=2000,
               batch_size=1024)
SMALL = Setting(StructuredSpec(d_in=32, n_atoms=64, active=3.0, n_parents=4, n_children=3,
                               n_groups=4, group_size=3),
                train_rows=32_768, heldout_rows=8192, steps=300, batch_size=256)


def sae_jax_command() -> list[str]:
    """The installed `sae-jax` console script next to this interpreter (else `-m sae_jax`,
    the same `cli.main`)."""
    script = Path(sys.executable).with_name("sae-jax")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sae_jax"]


def run_cli(*args) -> dict:
    """Runs one `sae-jax` command; its result is the last stdout line (strict JSON)."""
    proc = subprocess.run([*sae_jax_command(), *map(str, args)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"sae-jax {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def make_data(setting: Setting, out: Path) -> dict:
    """Writes the training rows and imports them (`OUT/data`); returns the truth and the
    held-out rows with their codes (regenerated: they are a pure function of the seed)."""
    structure = make_structure(setting.spec, seed=0)
    rows, codes = sample(structure, setting.heldout_rows, HELDOUT_STREAM)
    if not (out / "data").exists():
        (out / "synthetic").mkdir(parents=True, exist_ok=True)
        npy = write_rows(structure, out / "synthetic" / "rows.npy", setting.train_rows)
        run_cli("import", npy, out / "data")
        npy.unlink()
    return {"structure": structure, "rows": rows, "codes": codes}


def sweep_members(setting: Setting, archs: list[str]) -> list[dict]:
    k = max(1, round(setting.spec.active))
    return [{"arch": a, "width": setting.spec.n_atoms,
             **({"sparsity_coeff": SPARSITY[a]} if a in SPARSITY else {"k": k})}
            for a in archs]


def train_all(setting: Setting, archs: list[str], out: Path, seeds: list[int],
              dead_tokens: int) -> dict[tuple[str, int], str]:
    """Trains every architecture × seed in one `sae-jax train` pass (a seed sweep shares one
    batch order: the seeds differ in initialisation); {(arch, seed): run dir}."""
    sweep = out / "sweep.json"
    sweep.write_text(json.dumps(sweep_members(setting, archs)))
    result = run_cli("train", out / "data", out / "runs", "--sweep", sweep, "--quiet",
                     f"seed={','.join(map(str, seeds))}", f"steps={setting.steps}",
                     f"batch_size={setting.batch_size}", f"dead_tokens={dead_tokens}",
                     f"log_every={setting.steps // 4}", f"ckpt_every={setting.steps}")
    configs = {m["run_dir"]: sae_jax.load(m["run_dir"]).config for m in result["members"]}
    return {(c.arch, c.seed): run_dir for run_dir, c in configs.items()}


def score_run(sae, truth, data: dict, seed: int) -> dict:
    """One trained SAE and its two random baselines (same width, its held-out L0, `seed`)
    scored on the held-out rows: `{"trained", "baselines": {name: scores}, "margins":
    {name: {metric: margin}}}` (positive margin = trained better)."""
    trained = score_sae(sae, truth.atoms, data["rows"], data["codes"], feature_kinds(truth))
    base = {name: score_sae(b, truth.atoms, data["rows"], data["codes"])
            for name, b in baseline_saes(sae, trained["l0"], seed).items()}
    return {"trained": trained, "baselines": base,
            "margins": margins(trained, base, HIGHER_IS_BETTER)}


def summarise(scores: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """{arch: {metric: {"per_run", "mean", "half_width", ...}}} (`seed_stats.across_runs`:
    mean ± 95 % Student-t interval across seeds)."""
    return {arch: across_runs(runs) for arch, runs in scores.items()}


def summarise_by_baseline(per_arch: dict[str, list[dict[str, dict]]]) -> dict:
    """{arch: {baseline: {metric: across_runs entry}}} of the seeds' `{baseline: scores}`
    (the baselines' own scores, or the margins over them)."""
    return {arch: {b: across_runs([run[b] for run in runs]) for b in runs[0]}
            for arch, runs in per_arch.items()}


def _cell(mean: float, half: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


def _mean(stat: dict) -> tuple[float, float | None]:
    return stat["mean"], stat["half_width"]


def table(summary: dict, random_mcc: float, n_seeds: int, pw: dict) -> str:
    """The README's markdown table: mean ± 95 % CI half-width per architecture, with the
    seeds' PW-MCC (`pw`: {arch: `seed_stats.pw_mcc`}; blank with fewer than two seeds)."""
    lines = [f"| arch ({n_seeds} seeds) | MCC | F1 | atoms ≥ 0.9 | FVU | L0 | PW-MCC |",
             "|---|---|---|---|---|---|---|"]
    for arch, row in summary.items():
        seeds_agree = "" if pw[arch]["mean"] is None else _cell(*_mean(pw[arch]), 3)
        lines.append(f"| {arch} | " + " | ".join(
            _cell(*_mean(row[m]), 2 if m == "l0" else 3) for m in METRICS)
            + f" | {seeds_agree} |")
    lines.append(f"| random unit dictionary | {random_mcc:.3f} | | | | | |")
    lines += ["", f"| arch: MCC / F1 by kind of feature (mean of {n_seeds} seeds) | "
              + " | ".join(KINDS) + " |", "|---" * (1 + len(KINDS)) + "|"]
    for arch, row in summary.items():
        lines.append(f"| {arch} | " + " | ".join(
            f"{row[f'mcc_{k}']['mean']:.2f} / {row[f'f1_{k}']['mean']:.2f}" for k in KINDS)
            + " |")
    return "\n".join(lines)


def _signed(stat: dict) -> str:
    half = stat["half_width"]
    return f"{stat['mean']:+.3f}" + ("" if half is None else f" ± {half:.3f}")


def margin_table(base: dict, margin: dict, n_seeds: int) -> str:
    """The baselines' MCC / F1 / FVU and the trained SAE's margins over them (positive =
    trained better), mean ± 95 % CI across seeds, per architecture and baseline."""
    names = [m.upper() if m != "f1" else "F1" for m in MARGIN_COLUMNS]
    lines = [f"| arch ({n_seeds} seeds) | baseline | " + " | ".join(names) + " | "
             + " | ".join(f"{n} margin" for n in names) + " |",
             "|---" * (2 + 2 * len(MARGIN_COLUMNS)) + "|"]
    for arch, by_baseline in base.items():
        for b, row in by_baseline.items():
            lines.append(f"| {arch} | {b} | " + " | ".join(
                _cell(*_mean(row[m]), 3) for m in MARGIN_COLUMNS) + " | " + " | ".join(
                _signed(margin[arch][b][m]) for m in MARGIN_COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/synthetic_bench")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--small", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--dead-tokens", type=int, default=250_000,
                        help="tokens without firing after which a latent is dead (AuxK)")
    args = parser.parse_args(argv)
    setting = SMALL if args.small else FULL
    seeds = [int(s) for s in args.seeds.split(",")]
    archs = args.archs.split(",")
    out = Path(args.out)
    start = time.perf_counter()
    data = make_data(setting, out)
    truth = data["structure"]
    data_s = time.perf_counter() - start
    scored: dict[str, list[dict]] = {a: [] for a in archs}
    decoders: dict[str, list[np.ndarray]] = {a: [] for a in archs}
    runs = train_all(setting, archs, out, seeds, args.dead_tokens)
    train_s = time.perf_counter() - start - data_s
    for (arch, seed), run_dir in sorted(runs.items()):
        sae = sae_jax.load(run_dir)
        scored[arch].append(score_run(sae, truth, data, seed))
        decoders[arch].append(np.asarray(sae.params["W_dec"]))
    rng = np.random.default_rng(0)
    random_mcc = mcc(rng.standard_normal(truth.atoms.shape), truth.atoms)["mcc"]
    scores = {a: [r["trained"] for r in v] for a, v in scored.items()}
    summary = summarise(scores)
    base = summarise_by_baseline({a: [r["baselines"] for r in v] for a, v in scored.items()})
    margin = summarise_by_baseline({a: [r["margins"] for r in v] for a, v in scored.items()})
    pw = {a: pw_mcc(decoders[a], [f"{a} seed {s}" for s in sorted(seeds)]) for a in archs}
    result = {"setting": "small" if args.small else "full", "seeds": seeds,
              "spec": dataclasses.asdict(setting.spec), "true_l0": truth.true_l0,
              "data_stats": structure_stats(truth, data["codes"]),
              "tokens_per_run": setting.steps * setting.batch_size,
              "dead_tokens": args.dead_tokens,
              "summary": summary, "random_dictionary_mcc": random_mcc, "pw_mcc": pw,
              "baseline_seed": "each run's own training seed",
              "baselines": base, "margins": margin, "runs": scores,
              "baseline_runs": {a: [r["baselines"] for r in v] for a, v in scored.items()},
              "data_s": data_s, "train_s": train_s, "wall_s": time.perf_counter() - start}
    md = (table(summary, random_mcc, len(seeds), pw) + "\n\n"
          + margin_table(base, margin, len(seeds)))
    (out / "bench.md").write_text(md + "\n")
    (out / "bench.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    print(md)
    print(json.dumps(result, allow_nan=False))
    return result


if __name__ == "__main__":
    main()
