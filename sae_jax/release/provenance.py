"""What a bundle says about where its SAE came from and what it cost: `provenance.json` and
`bill.json`, from the run's and the store's own records (nothing is re-measured).

provenance.json  {"model": {"name", "kind" ("minilm" | "causal"), "model_type", "dtype",
                            "sha256": {weight file: hex}},
                  "layer", "site", "pair", "hook", "seq_len", "keep_special",
                  "activation_dtype" (the store's), "d_in",
                  "corpus": {"description", "sha256" (of the store's token_ids + positions)},
                  "n_tokens": {"trained" (steps × batch_size), "store_rows", "train_rows"},
                  "training_config", "step", "input_scale" (a float, or per column: a
                  list, for a run on a multi-source store),
                  "code_version": {"sae_jax", "git_commit", "git_dirty"}, "store_id"}
bill.json        {"steps", "batch_size", "tokens", "wall_seconds", "chip_hours", "accelerator",
                  "chips", "mfu", "formula"}
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from sae_jax import files, scales
from sae_jax.data.store import POSITIONS, TOKEN_IDS
from sae_jax.errors import UserError
from sae_jax.lm.hooks import MODEL_NAME, is_causal
from sae_jax.training.metrics import METRICS_FILE

DEFAULT_ACCELERATOR = "v5p-8"
HASH_BLOCK_ROWS = 1 << 20


def model_sha256(folder) -> dict[str, str]:
    """SHA-256 of each weight file of a model folder; "minilm" is the packaged MiniLM."""
    from sae_jax.lm import hf, minilm

    return hf.weights_sha256(minilm.model_dir() if str(folder) == "minilm" else folder)


def model_record(meta: dict) -> dict:
    """The store's model: name, kind, and the SHA-256 of its weight files (recorded by
    harvest for a causal LM; the packaged file's for MiniLM)."""
    if is_causal(meta):
        sha = meta.get("model_sha256") or model_sha256(meta["model_path"])
        return {"name": meta.get("model"), "kind": "causal",
                "model_type": meta.get("model_type"), "dtype": meta.get("model_dtype"),
                "sha256": sha}
    if meta.get("model") != MODEL_NAME:
        raise UserError(f"a bundle needs a store harvested from a model (MiniLM or a causal "
                        f"LM); this store's model is {meta.get('model')!r}")
    return {"name": MODEL_NAME, "kind": "minilm", "model_type": "bert", "dtype": "float32",
            "sha256": model_sha256("minilm")}


def corpus_sha256(store) -> str:
    """SHA-256 of the store's token ids then positions (int64, little-endian, row order):
    what the activations were computed on, independent of the activations themselves."""
    if store.token_ids is None or store.positions is None:
        raise UserError(f"store {store.path} has no token ids or positions to hash")
    digest = hashlib.sha256()
    for name in (TOKEN_IDS, POSITIONS):
        for start in range(0, store.n_rows, HASH_BLOCK_ROWS):
            block = store.read(name, start, min(store.n_rows, start + HASH_BLOCK_ROWS))
            digest.update(block.astype("<i8").tobytes())
    return digest.hexdigest()


def code_version() -> dict:
    """sae_jax's version and, when it runs from a git checkout, the commit and whether
    tracked files differ from it."""
    import sae_jax

    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(sae_jax.__file__).parent,
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or None
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"sae_jax": sae_jax.__version__, "git_commit": commit,
            "git_dirty": None if changes is None else bool(changes)}


def provenance(run, sae, store) -> dict:
    """provenance.json (module docstring) of a run's SAE and its training store."""
    meta = store.meta
    train_rows = len(store.split(sae.config.holdout)[0])
    return {
        "model": model_record(meta),
        "layer": meta.get("layer"), "site": meta.get("site", "resid"),
        "pair": (meta.get("pair") or {}).get("site"), "hook": meta.get("hook"),
        "seq_len": meta.get("seq_len"), "keep_special": bool(meta.get("keep_special", False)),
        "activation_dtype": meta.get("dtype", "float32"), "d_in": sae.d_in,
        "corpus": {"description": meta.get("corpus"), "sha256": corpus_sha256(store)},
        "n_tokens": {"trained": int(sae.step) * sae.config.batch_size,
                     "store_rows": int(store.n_rows), "train_rows": int(train_rows)},
        "training_config": sae.config.to_dict(), "step": int(sae.step),
        "input_scale": scales.to_json(sae.input_scale),
        "code_version": code_version(),
        "store_id": store.id,
    }


def wall_seconds(run_dir) -> float | None:
    """Measured training time from the run's metrics.jsonl: each record covers the steps
    since the previous one at its `tokens_per_s`, so the sum of (steps × batch / tokens_per_s)
    is the wall time between the first and the last record's start (compilation included,
    time before the first step and after the last record not). None without records."""
    from sae_jax.rundir import read_run

    text = files.read_text(files.join(str(run_dir), METRICS_FILE))
    if not text:
        return None
    batch = read_run(run_dir).config.batch_size
    total, last, seen = 0.0, 0, False
    for line in text.splitlines():
        try:
            record = json.loads(line)
            step, rate = int(record["step"]), float(record["tokens_per_s"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
        if rate > 0 and step > last:
            total += (step - last) * batch / rate
            seen = True
        last = max(last, step)
    return total if seen else None


def bill(run_dir, sae, accelerator: str = DEFAULT_ACCELERATOR) -> dict:
    """bill.json (module docstring): what the run's own records say it used, and the
    chip-hours `sae-jax cost` puts on the same work on `accelerator`."""
    from sae_jax.planning.cost import estimate_cost

    cfg = sae.config
    steps = int(sae.step)
    tokens = steps * cfg.batch_size
    estimate = estimate_cost(sae.d_in, sae.width, max(tokens, 1), accelerator, arch=cfg.arch,
                             k=min(cfg.k, sae.width), batch_size=cfg.batch_size)
    return {
        "steps": steps, "batch_size": cfg.batch_size, "tokens": tokens,
        "wall_seconds": wall_seconds(run_dir),
        "chip_hours": estimate["chip_hours"] if tokens else 0.0,
        "accelerator": accelerator, "chips": estimate["chips"], "mfu": estimate["mfu"],
        "formula": ("tokens = steps × batch_size; wall_seconds = measured, the sum over "
                    "metrics.jsonl records of steps × batch_size / tokens_per_s; chip_hours = "
                    f"estimated by sae-jax cost: tokens × {estimate['flop_count']} / (chips × "
                    "bf16 peak × MFU) / 3600 × chips"),
    }
