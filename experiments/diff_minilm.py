"""Model diffing on all-MiniLM-L6-v2: does a crosscoder find changes planted in a copy of the
model, where seed-to-seed `compare` of two separate SAEs cannot?

    python experiments/diff_minilm.py --out runs/diff_mlp                # full run, ~7 min
    python experiments/diff_minilm.py --plant embedding --out runs/diff  # full run, ~9 min
    python experiments/diff_minilm.py --out /tmp/diff --small            # smoke test, ~3-5 min

1. **The tuned model** is a copy of the packaged MiniLM folder (`minilm.model_dir()`) written
   as a Hugging Face BERT folder (`OUT/tuned_model`, `model.safetensors` via `safetensors`),
   with 2 added (expected B-only) and 1 removed (expected A-only) changes planted by one of
   two designs (`--plant`; each module's docstring says exactly how):
   - `mlp` (`diff_plant_mlp.py`, the default): where the harvest reads, as a fine-tune
     would, in the MLP of block 3 (HF `encoder.layer.2`, whose output `--layer 3` stores):
     two least-used neurons repurposed to fire on a token group and write a new direction,
     one strongly selective neuron's output zeroed;
   - `embedding` (`diff_plant_embedding.py`): directions added to / removed from the word
     embeddings of sets of 600 common tokens.
   Optionally (`--noise`) every weight matrix of blocks 1..3 also gets Gaussian noise (RMS =
   noise x its own RMS), as in `drift_minilm.py`, so the planted changes sit in diffuse ones.
2. **One two-source store**: `sae-jax harvest OUT/joint --model minilm --model
   OUT/tuned_model --names base,tuned --layer 3` runs both models on every batch of the same
   stdlib tokens, rows `[x_base | x_tuned]`. Two single-source stores are split from it (same
   rows and tokens), for the separate SAEs.
3. **Crosscoder**: the ReLU crosscoder (`arch=crosscoder`: L1 weighted by the summed
   per-source decoder norms, the paper's recipe) on the two-source store, and `sae-jax diff`
   with its dashboard section (OUT/xc/diff/dashboard/index.html). Not `crosscoder_batchtopk`:
   at these sizes (600 steps, width 512) it classed every latent shared, r in 0.45-0.55,
   even on activations with a constant direction added on 16 % of the rows, where the ReLU
   crosscoder gave that direction one latent of r 0.97 (decoder cosine 0.98): the summed-norm
   penalty shrinks a latent's useless decoder block, TopK's unit norm over all sources does
   not push it anywhere.
4. **Contrast**: a ReLU SAE on the base store (seed 0) and one on the tuned store (seed 1),
   matched by `compare` (each reading its own model's activations of the same held-out
   tokens): its *vanished* (base) and *appeared* (tuned) features are its candidate changes.

**Found.** Each change has its *rows* (embedding: the rows of its set's tokens; mlp: the rows
where its neuron's output, in the model that has it, is >= a quarter of its largest). A
latent *points at* a change if it fires on at least 10 rows, at least half of its 20
strongest rows (all rows of the store) are rows of the change, and those are at least 5
different tokens (a latent of one common token, which any SAE has, does not point at a
change). A planted
change is *found* by a method if some latent of its candidate list points at it: for the
crosscoder, its B-only latents for an added change and its A-only latents for a removed one;
for `compare`, the tuned SAE's appeared features for an added change and the base SAE's
vanished features for a removed one. *Precision* is the fraction of a list's latents that
point at any planted change: the rest are what a reviewer would wade through.

Writes OUT/plant.json (the design: a rerun of another one in OUT is refused),
OUT/tuned_model, OUT/joint (two-source store), OUT/base, OUT/tuned (split stores), OUT/xc
(+ xc/diff), OUT/sae_base, OUT/sae_tuned, OUT/compare (compare.json, compare.png) and
OUT/diff_summary.json; prints the table. Finished steps are skipped on a rerun.

Measured (2026-11-30, full sizes, on a shared 2-core box; docs/crosscoders.md reads both):
`--plant mlp` (7.2 min): every crosscoder latent shared (r 0.45-0.65), 0 of 3 found;
`compare` (PW-MCC 0.803) 0 of 3 among 24 vanished + 34 appeared (precision 2 %); the latents
closest to the added changes' rows are shared ones whose B decoder adds the new direction.
`--plant embedding` (9.0 min): every crosscoder latent shared, 0 of 3; `compare` (PW-MCC
0.768) 3 of 3 among 48 vanished + 57 appeared (precision 10 %).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

LAYER = 3
TOP, MIN_FIRING, MIN_DISTINCT = 20, 10, 5
SIZES = {
    "full": {"tokens": 100_000, "width": 1024, "steps": 1000, "batch_size": 1024},
    "small": {"tokens": 40_000, "width": 512, "steps": 600, "batch_size": 512},
}
MAX_ROWS = 20_000  # held-out rows `compare` reads
LR = 3e-3  # 3.75x the default at width 1024: decoders must travel from their r = 0.5 init


# ----------------------------------------------------------------------------------------
# The planted changes


def add_noise(tensors: dict, noise: float, layers: int = LAYER, seed: int = 1) -> dict:
    """Gaussian noise of RMS `noise` x each weight matrix's RMS on blocks 1..`layers`."""
    if noise <= 0:
        return tensors
    rng = np.random.default_rng(seed)
    out = dict(tensors)
    for name in sorted(tensors):
        w = tensors[name]
        block = name.split(".")[2] if name.startswith("encoder.layer.") else None
        if block is not None and int(block) < layers and w.ndim == 2:
            rms = np.sqrt(np.mean(np.square(w, dtype=np.float64)))
            out[name] = (w + noise * rms * rng.normal(size=w.shape)).astype(w.dtype)
    return out


def write_model(folder: Path, tensors: dict) -> Path:
    """The packaged MiniLM folder copied to `folder` with `tensors` as its weights."""
    from safetensors.numpy import save_file

    from sae_jax.lm import minilm

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(minilm.model_dir(), tmp)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(folder)
    return folder


# ----------------------------------------------------------------------------------------
# Stores


def harvest_two(data_dir: Path, tuned_model: Path, tokens: int) -> None:
    """`sae-jax harvest DATA --model minilm --model TUNED --names base,tuned --layer 3`: both
    models on every batch of the same stdlib sequences, rows `[x_base | x_tuned]`."""
    from sae_jax.cli import main as sae_jax

    argv = ["harvest", str(data_dir), "--model", "minilm", "--model", str(tuned_model),
            "--names", "base,tuned", "--layer", str(LAYER), "--max-tokens", str(tokens),
            "--quiet"]
    print("sae-jax " + " ".join(argv), file=sys.stderr)
    if sae_jax(argv) != 0:
        raise SystemExit("the harvest failed (its error is above)")


def split_sources(joint: Path, out: dict[str, Path]) -> None:
    """One single-source store per source of `joint` (same rows, tokens and positions)."""
    from sae_jax.data.store import POSITIONS, ROWS, TOKEN_IDS, StoreWriter, open_store

    store = open_store(joint)
    bounds = np.cumsum([0] + [int(s["d"]) for s in store.sources])
    for i, (name, path) in enumerate(out.items()):
        if (path / "meta.json").exists():
            continue
        meta = {k: v for k, v in store.meta.items() if k != "sources"}
        meta["split_from"] = {"store": str(joint), "source": store.sources[i]}
        with StoreWriter(path, d_in=int(bounds[i + 1] - bounds[i]), meta=meta,
                         with_tokens=True) as w:
            for lo in range(0, store.n_rows, store.chunk_rows):
                hi = min(lo + store.chunk_rows, store.n_rows)
                w.append(store.read(ROWS, lo, hi)[:, bounds[i]:bounds[i + 1]],
                         store.read(TOKEN_IDS, lo, hi), store.read(POSITIONS, lo, hi))


# ----------------------------------------------------------------------------------------
# Which latents point at a planted set


def top_rows(sae, store, latents: list[int], k: int = TOP, batch: int = 4096):
    """(rows (n, k) of each latent's `k` strongest rows, -1 where fewer fired; counts (n,)
    of rows it fired on), over every row of `store`."""
    from sae_jax.data.store import ROWS

    n = len(latents)
    best_v, best_r = np.full((n, k), -np.inf), np.full((n, k), -1, np.int64)
    counts = np.zeros(n, np.int64)
    if n == 0:
        return best_r, counts
    for lo in range(0, store.n_rows, batch):
        hi = min(lo + batch, store.n_rows)
        f = np.asarray(sae.encode(store.read(ROWS, lo, hi), columns=latents)).T  # (n, b)
        counts += (f > 0).sum(1)
        v = np.concatenate([best_v, np.where(f > 0, f, -np.inf)], 1)
        r = np.concatenate([best_r, np.broadcast_to(np.arange(lo, hi), f.shape)], 1)
        pick = np.argsort(-v, axis=1, kind="stable")[:, :k]
        best_v, best_r = np.take_along_axis(v, pick, 1), np.take_along_axis(r, pick, 1)
    return np.where(np.isfinite(best_v), best_r, -1), counts


def pointed_changes(rows: np.ndarray, counts: np.ndarray, token_ids: np.ndarray,
                    members: list[np.ndarray]) -> list[int | None]:
    """Per latent, the index of the planted change it points at (module docstring), or None;
    `members[j]` is the boolean mask of the store's rows of change j."""
    out = []
    for r, c in zip(rows, counts):
        r = r[r >= 0]
        share = [m[r].sum() / TOP for m in members]
        best = int(np.argmax(share)) if share else 0
        distinct = len(np.unique(token_ids[r[members[best][r]]])) if share else 0
        out.append(best if c >= MIN_FIRING and share and share[best] >= 0.5
                   and distinct >= MIN_DISTINCT else None)
    return out


def score(lists: dict[str, list[int]], pointed: dict[str, list], plan: list[dict]) -> dict:
    """Found changes and precision of candidate lists {class: latents} with their pointed
    sets; each planted change is looked for in the list of its expected class."""
    found = []
    for j, p in enumerate(plan):
        hits = [lat for lat, s in zip(lists[p["expected"]], pointed[p["expected"]]) if s == j]
        found.append(hits)
    n_listed = sum(len(v) for v in lists.values())
    n_pointing = sum(s is not None for v in pointed.values() for s in v)
    return {"listed": {k: len(v) for k, v in lists.items()},
            "found": sum(bool(h) for h in found), "of": len(plan),
            "latents_per_change": [h[:10] for h in found],
            "precision": n_pointing / n_listed if n_listed else None}


def closest_latents(sae, store, members: list[np.ndarray], batch: int = 4096) -> list[dict]:
    """Per change, the crosscoder latent whose activation correlates best with the change's
    row mask, and how its decoders sit: `cos_b` of its B decoder with the mean change on the
    rows (x_B - x_A), `cos_a` of its A decoder with the rows' mean x_A minus the overall
    mean: a latent that took the change into a shared feature of those rows has both high."""
    from sae_jax.data.store import ROWS

    m = np.stack(members, 1).astype(np.float64)                        # (N, J)
    sf = sff = sfm = sx = sxm = 0.0
    for lo in range(0, store.n_rows, batch):
        x = np.asarray(store.read(ROWS, lo, min(lo + batch, store.n_rows)), np.float64)
        f = np.asarray(sae.encode(x), np.float64)
        sf, sff = sf + f.sum(0), sff + (f * f).sum(0)
        sfm, sx, sxm = sfm + f.T @ m[lo:lo + len(x)], sx + x.sum(0), sxm + m[lo:lo + len(x)].T @ x
    n, nj = len(m), m.sum(0)
    cov = sfm - np.outer(sf, nj) / n
    corr = cov / np.sqrt(np.maximum(np.outer(sff - sf ** 2 / n, nj * (1 - nj / n)), 1e-30))
    W = np.asarray(sae.params["W_dec"], np.float64)
    d = W.shape[1] // 2
    out = []
    for j in range(m.shape[1]):
        i = int(np.nanargmax(corr[:, j]))
        mean_rows, mean_all = sxm[j] / nj[j], sx / n
        change, base = mean_rows[d:] - mean_rows[:d], mean_rows[:d] - mean_all[:d]
        out.append({"latent": i, "corr": float(corr[i, j]),
                    "cos_b": _cos(W[i, d:], change), "cos_a": _cos(W[i, :d], base)})
    return out


def _cos(u, v) -> float:
    return float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-30))


# ----------------------------------------------------------------------------------------
# The run


def train_run(cfg_kwargs: dict, data: Path, run: Path) -> None:
    import sae_jax
    from sae_jax.config import make_config
    from sae_jax.errors import UserError
    from sae_jax.training.train import train

    try:
        if sae_jax.load(run).step >= cfg_kwargs["steps"]:
            return
    except UserError:
        pass
    train(make_config(log_every=100, ckpt_every=cfg_kwargs["steps"], **cfg_kwargs), data, run,
          progress=False)


def main(argv: list[str] | None = None) -> dict:
    import sae_jax
    from sae_jax import files
    from sae_jax.analysis import compare
    from sae_jax.analysis.diff import classify, diff_run, plot_diff
    from sae_jax.analysis.diff_dashboard import write_diff_site
    from sae_jax.data.store import TOKEN_IDS, open_store
    from sae_jax.lm import minilm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--plant", choices=("mlp", "embedding"), default="mlp",
                        help="where the changes are planted (default %(default)s)")
    parser.add_argument("--strength", type=float, default=None,
                        help="an added change's size: x the set's mean embedding norm "
                             "(embedding, default 0.5) or its median write x the mean MLP "
                             "input norm (mlp, default 0.5)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="also Gaussian weight noise on blocks 1..3 (default 0)")
    args = parser.parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times, t_start = {}, time.perf_counter()

    def step(name, fn, *a):
        t0 = time.perf_counter()
        value = fn(*a)
        times[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {times[name]} s", file=sys.stderr)
        return value

    from safetensors.numpy import load_file

    tokenizer = minilm.load_tokenizer()
    base_tensors = load_file(str(minilm.model_dir() / "model.safetensors"))
    design = {"plant": args.plant, "strength": args.strength, "noise": args.noise, **size}
    if (out / "plant.json").exists() and json.loads((out / "plant.json").read_text()) != design:
        raise SystemExit(f"{out} holds a run of another design ({out / 'plant.json'})")
    files.write_text(out / "plant.json", json.dumps(design) + "\n")
    plant = importlib.import_module(f"diff_plant_{args.plant}")  # a sibling script module
    tuned_tensors, plan, rows_of = step("plan the changes", plant.design, tokenizer,
                                        base_tensors, size["tokens"], args.strength)
    tuned_model = out / "tuned_model"
    if not tuned_model.exists():
        step("write tuned model", write_model, tuned_model, add_noise(tuned_tensors, args.noise))
    joint = out / "joint"
    if not (joint / "meta.json").exists():
        step("harvest both models", harvest_two, joint, tuned_model, size["tokens"])
    stores = {"base": out / "base", "tuned": out / "tuned"}
    step("split sources", split_sources, joint, stores)

    common = {"width": size["width"], "steps": size["steps"], "batch_size": size["batch_size"],
              "lr": LR}
    step("train crosscoder", train_run, {"arch": "crosscoder", "seed": 0, **common},
         joint, out / "xc")
    step("train sae base", train_run, {"arch": "relu", "seed": 0, **common}, stores["base"],
         out / "sae_base")
    step("train sae tuned", train_run, {"arch": "relu", "seed": 1, **common}, stores["tuned"],
         out / "sae_tuned")

    diff = step("diff", diff_run, str(out / "xc"))
    png = plot_diff(diff)
    (out / "xc" / "diff").mkdir(exist_ok=True)
    files.write_text(out / "xc" / "diff" / "diff.json", files.strict_json(diff) + "\n")
    files.write_bytes(out / "xc" / "diff" / "diff.png", png)
    xc = sae_jax.load(out / "xc")
    site = step("diff dashboard", lambda: write_diff_site(
        xc, diff, str(joint), out / "xc" / "diff" / "dashboard", png, max_latents=50))
    cmp = step("compare", lambda: compare.compare(out / "sae_base", out / "sae_tuned",
                                                  stores["base"], stores["tuned"],
                                                  max_rows=MAX_ROWS))
    compare.write_compare_artifacts(cmp, out / "compare")

    tokens = open_store(joint).read(TOKEN_IDS, 0, open_store(joint).n_rows)
    members = rows_of(tokens)

    def points(sae, store, lists):
        return {cls: pointed_changes(*top_rows(sae, open_store(store), ids), tokens, members)
                for cls, ids in lists.items()}

    xc_lists = {c: diff["latents"][c] for c in ("A-only", "B-only")}
    cat = cmp["per_feature"]
    cmp_lists = {"A-only": [i for i, c in enumerate(cat["a"]["category"]) if c == "vanished"],
                 "B-only": [i for i, c in enumerate(cat["b"]["category"]) if c == "appeared"]}
    xc_points = step("score crosscoder", points, xc, joint, xc_lists)
    cmp_points = step("score compare", lambda: {
        "A-only": points(sae_jax.load(out / "sae_base"), stores["base"],
                         {"A-only": cmp_lists["A-only"]})["A-only"],
        "B-only": points(sae_jax.load(out / "sae_tuned"), stores["tuned"],
                         {"B-only": cmp_lists["B-only"]})["B-only"]})
    # Where the change went when no latent is exclusive: every crosscoder latent that points
    # at a set, with its relative norm and the cosine of its two decoders.
    everyone = step("score all crosscoder latents", lambda: pointed_changes(
        *top_rows(xc, open_store(joint), list(range(diff["width"]))), tokens, members))
    r_all, cos_all = (np.asarray(diff[k], float) for k in ("relative_norm", "cosine"))
    pointing = [[i for i, s_ in enumerate(everyone) if s_ == j] for j in range(len(plan))]
    others = [i for i, s_ in enumerate(everyone) if s_ is None]

    closest = step("closest crosscoder latents", closest_latents, xc, open_store(joint), members)
    for c in closest:
        c.update(r=float(r_all[c["latent"]]), cls=str(classify(r_all[[c["latent"]]])[0]))

    def medians(ids):
        return {"latents": len(ids), "median_r": _median(r_all[ids]),
                "median_cosine": _median(cos_all[ids])}

    result = {
        "size": size, "strength": args.strength, "noise": args.noise,
        "plant": args.plant,
        "changes": [{"kind": p["kind"], "expected": p["expected"],
                     "n_tokens": len(p["token_ids"]), "share_of_rows": float(m.mean()),
                     "distinct_tokens_of_rows": len(np.unique(tokens[m])),
                     "tokens": [tokenizer.id_to_token(i) for i in p["token_ids"]],
                     **{k: p[k] for k in ("neuron", "fires_on") if k in p}}
                    for p, m in zip(plan, members)],
        "crosscoder": {"counts": diff["counts"], **score(xc_lists, xc_points, plan),
                       "median_shared_cosine": diff["median_shared_cosine"],
                       "pointing": [medians(ids) for ids in pointing],
                       "other_latents": medians(others), "closest": closest},
        "compare": {"pwmcc": cmp["matched_cosine_mean"], "matched_frac_a": cmp["matched_frac_a"],
                    **score(cmp_lists, cmp_points, plan)},
        "dashboard": site["index"], "seconds": times,
        "total_seconds": round(time.perf_counter() - t_start, 1)}
    files.write_text(out / "diff_summary.json", json.dumps(files.json_safe(result), indent=1,
                                                           allow_nan=False) + "\n")
    print("\n" + table(result))
    print(f"total {result['total_seconds']} s; dashboard {site['index']}")
    return result


def table(r: dict) -> str:
    """The README's table: per method its lists, found changes and precision."""
    x, c = r["crosscoder"], r["compare"]
    n = x["counts"]
    head = ("| method | candidate changes (A side / B side) | planted changes found | "
            "precision of the lists |")
    lines = [head, "|---|---|---|---|",
             f"| crosscoder diff ({n['shared']} shared, {n['mixed']} mixed, {n['empty']} empty) "
             f"| {n['A-only']} A-only / {n['B-only']} B-only | {x['found']} of {x['of']} | "
             f"{_pct(x['precision'])} |",
             f"| seed-to-seed `compare` (PW-MCC {c['pwmcc']:.3f}) | {c['listed']['A-only']} "
             f"vanished / {c['listed']['B-only']} appeared | {c['found']} of {c['of']} | "
             f"{_pct(c['precision'])} |"]
    changes = "; ".join(f"{ch['kind']} {{{', '.join(ch['tokens'][:4])}, ...}} "
                        f"({ch['share_of_rows']:.1%} of rows) -> "
                        f"{'found' if x['latents_per_change'][i] else 'missed'} "
                        f"{x['latents_per_change'][i][:3]}"
                        for i, ch in enumerate(r["changes"]))
    o = x["other_latents"]
    where = "; ".join(f"set {i}: {p['latents']} latents, median r {_fmt(p['median_r'])}, "
                      f"cosine {_fmt(p['median_cosine'])}" for i, p in enumerate(x["pointing"]))
    near = "; ".join(f"change {i}: latent {c['latent']} (corr {c['corr']:.2f}, r {c['r']:.2f} "
                     f"{c['cls']}, B decoder . change {c['cos_b']:.2f}, A decoder . base "
                     f"{c['cos_a']:.2f})" for i, c in enumerate(x["closest"]))
    return ("\n".join(lines) + "\ncrosscoder per change: " + changes
            + f"\ncrosscoder latents pointing at each set: {where}; the {o['latents']} others: "
              f"median r {_fmt(o['median_r'])}, cosine {_fmt(o['median_cosine'])}"
            + f"\nclosest crosscoder latent (activation vs the change's rows): {near}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _median(x) -> float | None:
    return float(np.nanmedian(x)) if len(x) else None


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


if __name__ == "__main__":
    main()
