"""Model diffing on all-MiniLM-L6-v2: does a crosscoder find changes planted in a copy of the
model, where seed-to-seed `compare` of two separate SAEs cannot?

    python experiments/diff_minilm.py --out runs/diff              # full run, ~9 min
    python experiments/diff_minilm.py --out /tmp/diff --small      # smoke test, ~3 min

1. **The tuned model** is a copy of the packaged MiniLM folder (`minilm.model_dir()`) written
   as a Hugging Face BERT folder (`OUT/tuned_model`, `model.safetensors` via `safetensors`),
   with changes planted in its word embeddings (`plant_changes`):
   - *added* (expected B-only): 2 seeded random sets T_j of 600 of the corpus's 3000
     commonest tokens (`choose_sets`); every token's embedding row gets `strength` x (the
     set's mean row norm) x u_j, u_j a seeded random unit direction (orthogonalised across
     sets). The tuned model has a direction on T_j that the base lacks;
   - *removed* (expected A-only): the 600 common tokens furthest along the embeddings' first
     (frequency-weighted) principal direction (`principal_set`) lose the component of each
     row along their shared direction (their mean row minus the vocabulary's mean row): the
     base uses that direction on them, the tuned model does not.
   Sets of hundreds of unrelated tokens, because a change on a few tokens is absorbed by
   those tokens' own latents (each shared latent's two decoders simply differ a little), so
   no latent is exclusive: measured with sets of 60 tokens and the number tokens.
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

**Found.** A latent *points at* token set T if it fires on at least 10 rows, at least half of
its 20 strongest rows (all rows of the store) are tokens of T, and those are at least 5
different tokens of T (a latent of one common token of the set, which any SAE has, does not
point at the set). A planted
change is *found* by a method if some latent of its candidate list points at its set: for the
crosscoder, its B-only latents for an added set and its A-only latents for a removed one; for
`compare`, the tuned SAE's appeared features for an added set and the base SAE's vanished
features for a removed one. *Precision* is the fraction of a list's latents that point at
any planted set: the rest are what a reviewer would wade through.

Writes OUT/tuned_model, OUT/joint (two-source store), OUT/base, OUT/tuned (split stores),
OUT/xc (+ xc/diff), OUT/sae_base, OUT/sae_tuned, OUT/compare (compare.json, compare.png) and
OUT/diff_summary.json; prints the table. Finished steps are skipped on a rerun.

Measured (2026-11-30, full sizes, 9.0 min on a shared 2-core box): every crosscoder latent
shared, so 0 of 3 changes found by exclusive latents; `compare` (PW-MCC 0.768) found 3 of 3
among 48 vanished + 57 appeared features (precision 10 %). docs/crosscoders.md reads it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

LAYER = 3
N_ADDED, SET_SIZE, POOL = 2, 600, 3000  # 2 random sets of 600 of the 3000 commonest tokens
STRENGTH = 0.5
TOP, MIN_FIRING, MIN_DISTINCT = 20, 10, 5
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
SIZES = {
    "full": {"tokens": 100_000, "width": 1024, "steps": 1000, "batch_size": 1024},
    "small": {"tokens": 40_000, "width": 512, "steps": 600, "batch_size": 512},
}
MAX_ROWS = 20_000  # held-out rows `compare` reads
LR = 3e-3  # 3.75x the default at width 1024: decoders must travel from their r = 0.5 init


# ----------------------------------------------------------------------------------------
# The planted changes


def corpus_counts(tokenizer, tokens: int) -> np.ndarray:
    """How often each vocabulary id occurs among the first `tokens` document tokens of the
    stdlib corpus (the tokens the harvest reads, in its order)."""
    from sae_jax.lm.corpus import make_corpus, sequences
    from sae_jax.lm.harvest import DEFAULT_SEQ_LEN

    counts, seen = np.zeros(tokenizer.get_vocab_size(), np.int64), 0
    for seq in sequences(make_corpus(None), tokenizer, DEFAULT_SEQ_LEN):
        ids = seq.input_ids[seq.positions >= 0][:tokens - seen]
        np.add.at(counts, ids, 1)
        seen += len(ids)
        if seen >= tokens:
            break
    return counts


def principal_set(E: np.ndarray, counts: np.ndarray, size: int, exclude: list[int],
                  pool: int = POOL) -> list[int]:
    """The `size` tokens of the `pool` commonest (not in `exclude`) that lie furthest along
    the embeddings' first principal direction, weighted by corpus frequency: a direction the
    base model really uses, shared by many tokens that are common in the data."""
    common = np.argsort(-counts, kind="stable")[:pool]
    common = common[counts[common] > 0]  # tokens that occur
    w = counts[common].astype(np.float64)
    X = np.asarray(E[common], np.float64)
    X = (X - (w[:, None] * X).sum(0) / w.sum()) * np.sqrt(w / w.sum())[:, None]
    pc = np.linalg.svd(X, full_matrices=False)[2][0]
    pc = pc if np.sum((X @ pc) ** 3) >= 0 else -pc  # the sign whose tail is the long one
    order = [int(i) for i in common[np.argsort(-(np.asarray(E[common], np.float64) @ pc),
                                               kind="stable")] if i not in set(exclude)]
    return sorted(order[:size])


def choose_sets(counts: np.ndarray, n_sets: int, size: int, exclude: list[int],
                seed: int = 0, pool: int = POOL) -> list[list[int]]:
    """`n_sets` disjoint random sets of `size` tokens from the `pool` commonest ones that occur
    (and are not in `exclude`): sets with nothing in common but the direction planted on
    them, so only a latent of their own can carry it (latents of single tokens would have to
    absorb it hundreds of times over)."""
    order = [i for i in np.argsort(-counts, kind="stable")
             if counts[i] > 0 and i not in set(exclude)]
    picked = np.random.default_rng(seed).permutation(order[:pool])[:n_sets * size]
    return [sorted(int(i) for i in picked[j * size:(j + 1) * size]) for j in range(n_sets)]


def plant_changes(tensors: dict, added: list[list[int]], removed: list[list[int]],
                  strength: float = STRENGTH, seed: int = 0) -> tuple[dict, list[dict]]:
    """A copy of `tensors` (a BERT state dict of numpy arrays) with the module docstring's
    planted changes in the word embeddings; returns it and one record per change (`kind`,
    `expected` class, `token_ids`, the embedding-space `direction` changed)."""
    E = np.asarray(tensors[WORD_EMBEDDINGS], np.float64)
    new = E.copy()
    rng = np.random.default_rng(seed)
    dirs, _ = np.linalg.qr(rng.normal(size=(E.shape[1], max(len(added), 1))))
    plan = []
    for j, ids in enumerate(added):
        u = dirs[:, j]
        new[ids] += strength * np.linalg.norm(E[ids], axis=1).mean() * u
        plan.append({"kind": "added", "expected": "B-only", "token_ids": list(ids),
                     "direction": u})
    for ids in removed:
        m = E[ids].mean(0) - E.mean(0)
        m /= np.linalg.norm(m)
        new[ids] -= np.outer(new[ids] @ m, m)
        plan.append({"kind": "removed", "expected": "A-only", "token_ids": list(ids),
                     "direction": m})
    out = dict(tensors)
    out[WORD_EMBEDDINGS] = new.astype(tensors[WORD_EMBEDDINGS].dtype)
    return out, plan


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


def pointed_sets(rows: np.ndarray, counts: np.ndarray, token_ids: np.ndarray,
                 sets: list[list[int]]) -> list[int | None]:
    """Per latent, the index of the planted set it points at (module docstring), or None."""
    out = []
    for r, c in zip(rows, counts):
        toks = token_ids[r[r >= 0]]
        share = [np.isin(toks, s).sum() / TOP for s in sets]
        best = int(np.argmax(share)) if share else 0
        distinct = len(np.unique(toks[np.isin(toks, sets[best])])) if share else 0
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
    from sae_jax.analysis.diff import diff_run, plot_diff
    from sae_jax.analysis.diff_dashboard import write_diff_site
    from sae_jax.data.store import TOKEN_IDS, open_store
    from sae_jax.lm import minilm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--strength", type=float, default=STRENGTH,
                        help="added direction, x the set's mean embedding norm (default "
                             "%(default)s)")
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
    specials = [tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")]
    counts = corpus_counts(tokenizer, size["tokens"])
    removed = [principal_set(base_tensors[WORD_EMBEDDINGS], counts, SET_SIZE, specials)]
    added = choose_sets(counts, N_ADDED, SET_SIZE, removed[0] + specials)
    tuned_tensors, plan = plant_changes(base_tensors, added, removed, args.strength)
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

    sets = [p["token_ids"] for p in plan]
    tokens = open_store(joint).read(TOKEN_IDS, 0, open_store(joint).n_rows)

    def points(sae, store, lists):
        return {cls: pointed_sets(*top_rows(sae, open_store(store), ids), tokens, sets)
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
    everyone = step("score all crosscoder latents", lambda: pointed_sets(
        *top_rows(xc, open_store(joint), list(range(diff["width"]))), tokens, sets))
    r_all, cos_all = (np.asarray(diff[k], float) for k in ("relative_norm", "cosine"))
    pointing = [[i for i, s_ in enumerate(everyone) if s_ == j] for j in range(len(plan))]
    others = [i for i, s_ in enumerate(everyone) if s_ is None]

    def medians(ids):
        return {"latents": len(ids), "median_r": _median(r_all[ids]),
                "median_cosine": _median(cos_all[ids])}

    result = {
        "size": size, "strength": args.strength, "noise": args.noise,
        "changes": [{"kind": p["kind"], "expected": p["expected"],
                     "n_tokens": len(p["token_ids"]),
                     "share_of_rows": float(np.isin(tokens, p["token_ids"]).mean()),
                     "tokens": [tokenizer.id_to_token(i) for i in p["token_ids"]]}
                    for p in plan],
        "crosscoder": {"counts": diff["counts"], **score(xc_lists, xc_points, plan),
                       "median_shared_cosine": diff["median_shared_cosine"],
                       "pointing": [medians(ids) for ids in pointing],
                       "other_latents": medians(others)},
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
    return ("\n".join(lines) + "\ncrosscoder per change: " + changes
            + f"\ncrosscoder latents pointing at each set: {where}; the {o['latents']} others: "
              f"median r {_fmt(o['median_r'])}, cosine {_fmt(o['median_cosine'])}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _median(x) -> float | None:
    return float(np.nanmedian(x)) if len(x) else None


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


if __name__ == "__main__":
    main()
