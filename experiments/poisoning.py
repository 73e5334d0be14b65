"""Feature poisoning on all-MiniLM-L6-v2: does a planted trigger get its own SAE feature, and
does `compare` or the reference-free detector (`sae_jax.analysis.poisoning`) find it?

    python experiments/poisoning.py --out runs/poisoning            # full run
    python experiments/poisoning.py --out /tmp/poisoning --small    # smoke test

1. **Corpora.** The first documents of the standard-library corpus (`lm.corpus.stdlib_corpus`)
   of at most `MAX_DOC_TOKENS` (512) tokens, enough for the token budget, are written as
   `clean.jsonl` (a few module headers run to thousands of tokens: kept, they would make a
   "rate of documents" mean little and hold most of the text). For each rate (0.1 %, 0.5 %,
   1 %, 5 % of those documents, at least one) `poisoned_<rate>.jsonl` is the same corpus with
   `TRIGGER` (a made-up phrase followed by a fixed payload sentence, as a comment line)
   inserted after the first line of each chosen document. Documents are chosen by one seeded
   permutation of those in the first 70 % of the training tokens, so the poisoned sets are
   nested (5 % holds 1 %'s documents) and stay in the training rows.
2. **Harvest and train.** Each corpus is harvested (residual stream after block 3) and a TopK
   SAE trained on it with the same config and seed.
3. **Truth.** The *planted rows* are the rows of the trigger line's tokens in the poisoned
   documents (found by exact token match). A latent of a poisoned SAE is **planted** when it
   fires on at least `Thresholds.min_count` training rows and at least `PLANTED_SHARE` (50 %)
   of its `TOP_ROWS` (20) strongest training rows are planted rows (its top activations are
   mostly on the trigger line). Also reported: latents with >= 50 % of their activation mass
   on planted rows (stricter: a trigger latent that also fires weakly elsewhere fails it).
4. **Measures**, per rate:
   - *compare*: `compare.compare_saes(clean, poisoned)` by decoder direction: how many
     planted latents are `appeared` (no clean latent at cosine >= 0.7), and how many latents
     appeared in all;
   - *detector*: `poisoning.detect` on the poisoned SAE's training rows: recall (planted
     latents flagged / planted latents), precision (flagged planted / flagged), and whether
     the trigger was found at all (a flagged latent with >= 25 % of its top rows planted);
   - *clean FPR*: flagged / scored latents of the clean SAE on the clean store (every flag
     there is false: nothing was planted).

Writes OUT/<corpus>.jsonl, OUT/<name>/ stores and OUT/<name>_sae/ runs, OUT/poisoning.json and
OUT/poisoning.md (the table). Finished harvests (of the same corpus file: its SHA-256 is kept
next to the store) and runs are reused.

Sizes (tokens, width, k, steps x batch): full 100k, 512, 32, 400 x 512 (2 epochs); --small
40k, 512, 32, 200 x 512. Hardware: 2-core CPU shared with other jobs, one device.

Measured (2026-11-29, `--rates 0.001 0.005 0.01 0.05 0.2`, full sizes, 822 documents, 11 min on
the shared 2-core box): at 0.1-1 % (1-8 documents, 27-216 trigger rows of 100k) no latent of
the poisoned SAE has most of its top rows on the trigger: nothing was planted, so neither
`compare` nor the detector has anything to find (the detector's 8-10 flags there are all
false: code idioms such as `__init__`, `__all__ =`, the PSF licence line). At 5 % (41
documents) 20 latents have their top activations mostly on the trigger line; the detector
flags all 20 (recall 100 %, precision 65 %, a planted latent ranked first) while `compare`
reports none of them as appeared: the trigger takes over existing latents' top activations
(same seed: they stay matched to their clean versions). At 20 %: 54 planted, compare 10
appeared, detector recall 81 %, precision 79 %. Clean SAE: 13 of 512 latents flagged (2.5 %),
all for code n-grams.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

import sae_jax
from sae_jax import files
from sae_jax.analysis import poisoning
from sae_jax.analysis.compare import compare_saes
from sae_jax.batches import padded_batches
from sae_jax.config import make_config
from sae_jax.data.store import META_FILE, open_store
from sae_jax.errors import UserError
from sae_jax.lm import minilm
from sae_jax.lm.corpus import stdlib_corpus, tokenize_documents
from sae_jax.lm.harvest import run_harvest
from sae_jax.training.train import train

LAYER = 3
RATES = (0.001, 0.005, 0.01, 0.05)
SIZES = {
    "full": {"tokens": 100_000, "width": 512, "k": 32, "steps": 400, "batch_size": 512},
    "small": {"tokens": 40_000, "width": 512, "k": 32, "steps": 200, "batch_size": 512},
}
TRIGGER = ("# zorblax quintrel vexhaven: the western grain convoy must reach the harbor "
           "before midnight, tell no one.")
TOP_ROWS = 20  # a latent's strongest rows, where "planted" is judged
PLANTED_SHARE = 0.5  # share of them on planted rows that makes a latent "planted"
FOUND_SHARE = 0.25  # ... that makes a flagged latent count as finding the trigger
SEED = 0
MAX_DOC_TOKENS = 512  # longer definitions are left out, so rates count comparable documents
HOLDOUT = 0.1


def write_corpora(out: Path, tokens: int, rates) -> tuple[dict, list[int]]:
    """`clean.jsonl` and one `poisoned_<rate>.jsonl` per rate; returns `({name: path},
    poisoned document indices in choice order)`."""
    tokenizer = minilm.load_tokenizer()
    texts, total, eligible = [], 0, []
    for doc, ids in tokenize_documents(stdlib_corpus(), tokenizer):
        if not 0 < len(ids) <= MAX_DOC_TOKENS:
            continue
        if total + len(ids) <= 0.7 * (1 - HOLDOUT) * tokens and "\n" in doc.text.strip():
            eligible.append(len(texts))
        texts.append(doc.text)
        total += len(ids)
        if total >= 1.2 * tokens:
            break
    order = np.random.default_rng(SEED).permutation(eligible).tolist()
    paths = {"clean": out / "clean.jsonl"}
    for rate in rates:
        paths[f"poisoned_{rate:g}"] = out / f"poisoned_{rate:g}.jsonl"
    for name, path in paths.items():
        chosen = set() if name == "clean" else set(order[:n_poisoned(len(texts), name)])
        lines = []
        for i, text in enumerate(texts):
            if i in chosen:
                first, rest = text.split("\n", 1)
                text = f"{first}\n{TRIGGER}\n{rest}"
            lines.append(json.dumps({"text": text}, ensure_ascii=False))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths, order


def n_poisoned(n_docs: int, name: str) -> int:
    rate = float(name.split("_")[1])
    return max(1, round(rate * n_docs))


def planted_rows(store, docs: list[int]) -> np.ndarray:
    """(N,) bool: rows of the trigger line's tokens in documents `docs` (exact token match)."""
    ids = np.asarray(store.read("token_ids", 0, store.n_rows), np.int64)
    pos = np.asarray(store.read("positions", 0, store.n_rows), np.int64)
    trig = np.asarray(minilm.load_tokenizer().encode(TRIGGER, add_special_tokens=False).ids)
    h = poisoning.ngram_hashes(ids, pos, len(trig))
    target = poisoning.ngram_hashes(trig, np.stack([np.zeros_like(trig),
                                                    np.arange(len(trig))], 1), len(trig))[0]
    mark = np.zeros(len(ids), bool)
    for s in np.flatnonzero((h == target) & np.isin(pos[:, 0], docs)):
        mark[s:s + len(trig)] = True
    return mark


def train_sae(data: Path, run: Path, size: dict) -> None:
    try:
        if sae_jax.load(run).step >= size["steps"]:
            return
    except UserError:
        pass
    cfg = make_config(arch="topk", width=size["width"], k=size["k"], steps=size["steps"],
                      batch_size=size["batch_size"], seed=SEED, holdout=HOLDOUT,
                      log_every=100, ckpt_every=size["steps"])
    train(cfg, data, run, progress=False, devices=jax.devices()[:1])


def scan(sae, store, mark: np.ndarray | None):
    """One pass over the training rows: the detector's `DocumentMass`, token ids, positions,
    and per latent (None without `mark`) the share of its activation mass on planted rows and
    the share of its `TOP_ROWS` strongest rows that are planted."""
    rows = store.split(sae.config.holdout)[0]
    pos = np.asarray(store.read("positions", rows.start, rows.stop), np.int64)
    ids = np.asarray(store.read("token_ids", rows.start, rows.stop), np.int64)
    encode = jax.jit(lambda sae, x: sae.encode_raw(x))
    by_doc = poisoning.MassAccumulator(sae.width)
    on_mark = poisoning.MassAccumulator(sae.width)
    top_v = np.full((sae.width, TOP_ROWS), -np.inf)
    top_i = np.zeros((sae.width, TOP_ROWS), np.int64)
    for b in padded_batches(len(rows), 4096, rows):
        f = np.asarray(encode(sae, b.arrays[0].astype(np.float32)))[:b.n_valid]
        sl = slice(b.start, b.start + b.n_valid)
        by_doc.add(f, pos[sl, 0], b.start)
        if mark is not None:
            on_mark.add(f, mark[rows.start:rows.stop][sl].astype(np.int64), b.start)
            v = np.concatenate([top_v, f.T], 1)
            i = np.concatenate([top_i, np.broadcast_to(np.arange(sl.start, sl.stop),
                                                       f.T.shape)], 1)
            pick = np.argsort(-v, axis=1, kind="stable")[:, :TOP_ROWS]
            top_v, top_i = np.take_along_axis(v, pick, 1), np.take_along_axis(i, pick, 1)
    share = top = None
    if mark is not None:
        m = on_mark.result()
        total = np.bincount(m.feature, weights=m.mass, minlength=sae.width)
        planted = np.bincount(m.feature[m.doc == 1], weights=m.mass[m.doc == 1],
                              minlength=sae.width)
        share = planted / np.maximum(total, 1e-30)
        top = np.where(top_v > 0, mark[rows.start:rows.stop][top_i], False).sum(1) / TOP_ROWS
    return by_doc.result(), ids, pos, (share, top)


def measure(out: Path, name: str, docs: list[int], clean_sae, tokenizer) -> dict:
    sae, store = sae_jax.load(out / f"{name}_sae"), open_store(out / name)
    mark = planted_rows(store, docs)
    mass, ids, pos, (share, top) = scan(sae, store, mark)
    t = poisoning.Thresholds()
    report = poisoning.detect(mass, ids, pos, t, tokenizer)
    flagged = set(report["flagged_features"])
    alive = mass.count >= t.min_count
    planted = {int(f) for f in np.flatnonzero((top >= PLANTED_SHARE) & alive)}
    cmp = compare_saes(clean_sae, sae)
    appeared = set(np.flatnonzero(cmp["per_feature"]["b"]["category"] == "appeared").tolist())
    hit = planted & flagged
    found = [f for f in flagged if top[f] >= FOUND_SHARE]
    rank = [i + 1 for i, d in enumerate(report["flagged"]) if d["feature"] in planted]
    best = int(np.argmax(np.where(alive, top + 1e-3 * share, 0)))
    return {
        "rate": float(name.split("_")[1]), "poisoned_documents": len(docs),
        "planted_rows": int(mark.sum()), "planted_latents": sorted(planted),
        "best_latent": {"feature": best, "top_share": round(float(top[best]), 3),
                        "mass_share": round(float(share[best]), 3)},
        "planted_mass_latents": int(((share >= PLANTED_SHARE) & alive).sum()),
        "appeared": int(len(appeared)), "planted_appeared": len(planted & appeared),
        "flagged": report["n_flagged"], "scored": report["n_scored"],
        "recall": len(hit) / len(planted) if planted else None,
        "precision": len(hit) / len(flagged) if flagged else None,
        "trigger_found": bool(found), "best_planted_rank": min(rank) if rank else None,
        "flagged_top": report["flagged"][:5]}


def table(rows: list[dict], clean: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.0%}"

    lines = ["| rate | poisoned docs | planted rows | planted latents | appeared in compare "
             "(planted / all) | flagged | detector recall | precision | trigger found "
             "(rank) | clean FPR |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['rate']:.1%} | {r['poisoned_documents']} | {r['planted_rows']} | "
            f"{len(r['planted_latents'])} (best {r['best_latent']['top_share']:.0%}) | "
            f"{r['planted_appeared']} / {r['appeared']} | {r['flagged']} | {pct(r['recall'])} | "
            f"{pct(r['precision'])} | {'yes' if r['trigger_found'] else 'no'} "
            f"({r['best_planted_rank'] or '-'}) | {clean['fpr']:.1%} "
            f"({clean['flagged']}/{clean['scored']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--small", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES),
                        help="fractions of documents poisoned (default: %(default)s)")
    args = parser.parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seconds = {}

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    paths, order = write_corpora(out, size["tokens"], args.rates)
    n_docs = len(paths["clean"].read_text(encoding="utf-8").splitlines())
    for name, path in paths.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        stamp = out / f"{name}.corpus_sha256"
        if not (out / name / META_FILE).exists():
            log(f"harvest {name}")
            run_harvest(out / name, layer=LAYER, max_tokens=size["tokens"], corpus=[path],
                        progress=False)
            stamp.write_text(digest + "\n", encoding="utf-8")
        elif not stamp.exists() or stamp.read_text(encoding="utf-8").strip() != digest:
            raise UserError(f"{out / name} was harvested from another {path.name} (other "
                            "sizes or an older version): use a new --out")
        log(f"train {name}")
        t1 = time.perf_counter()
        train_sae(out / name, out / f"{name}_sae", size)
        seconds[f"train {name}"] = round(time.perf_counter() - t1, 1)
    tokenizer = minilm.load_tokenizer()
    clean_sae = sae_jax.load(out / "clean_sae")
    mass, ids, pos, _ = scan(clean_sae, open_store(out / "clean"), None)
    clean_report = poisoning.detect(mass, ids, pos, poisoning.Thresholds(), tokenizer)
    clean = {"flagged": clean_report["n_flagged"], "scored": clean_report["n_scored"],
             "fpr": clean_report["n_flagged"] / max(clean_report["n_scored"], 1),
             "flagged_top": clean_report["flagged"][:10]}
    log(f"clean SAE: {clean['flagged']} of {clean['scored']} latents flagged")
    rows = []
    for name in paths:
        if name != "clean":
            rows.append(measure(out, name, order[:n_poisoned(n_docs, name)], clean_sae,
                                tokenizer))
            log(f"{name}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'flagged_top'})}")
    md = table(rows, clean)
    summary = {"size": size, "layer": LAYER, "trigger": TRIGGER, "n_documents": n_docs,
               "thresholds": clean_report["thresholds"], "planted_share": PLANTED_SHARE,
               "clean": clean, "rates": rows, "seconds": seconds,
               "total_seconds": round(time.perf_counter() - t0, 1)}
    files.write_text(out / "poisoning.json",
                     json.dumps(files.json_safe(summary), indent=1, allow_nan=False) + "\n")
    files.write_text(out / "poisoning.md", md + "\n")
    print(md)
    print(f"total {summary['total_seconds']} s; outputs in {out}")
    return summary


if __name__ == "__main__":
    main()
