"""k-sparse probing (SAEBench style): how well k of an SAE's latents carry labels the corpus
gives, against a probe on the raw activations.

**Tasks.** Every label family of the store's labelled held-out sample (`probe_data`,
`probe_labels`: Python token type, docstring/comment vs code, stdlib package; a jsonl
corpus's record fields) gives one-vs-rest binary tasks: a class against every other labelled
row, for the `MAX_CLASSES` classes with most training rows (a two-class family gives one task,
its rarer class). Rows are split into train and test by document (`probe_data.document_split`)
and each side is balanced by sampling (at most `MAX_PER_CLASS` rows per class), so chance is
0.5; a class with fewer than `MIN_ROWS` rows (or rest rows) on either side gives no task.

**Probes.** For each task and k in `K_VALUES` = (1, 2, 5, 20): the k latents with the largest
|mean activation difference| between the classes on the training rows, then the L2 logistic
probe (`probe_fit.fit_logistic`, scikit-learn's defaults) on those k latents; and the same
probe on all the raw activations (the reference; the SAE's input for a transcoder). Reported:
test accuracy per task, and `probe_acc_k{k}` / `probe_acc_raw`, their means over tasks.
Differences from SAEBench: labels are per token of our own corpus rather than mean-pooled
over sequences of its text datasets, and its train/test are separate texts where ours are
separate documents of the store's held-out tail.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from sae_jax.analysis.probe_data import PROBE_ROWS, document_split, load_sample
from sae_jax.analysis.probe_fit import (
    accuracy,
    balanced_indices,
    class_means,
    fit_logistic,
    latent_columns,
    top_latents,
)
from sae_jax.analysis.probe_labels import UNLABELED
from sae_jax.errors import UserError

K_VALUES = (1, 2, 5, 20)
MAX_CLASSES = 6
MIN_ROWS = 20
MAX_PER_CLASS = 2000
SEED = 0


@dataclass(frozen=True)
class Task:
    """One binary task: balanced train and test row indices and their labels."""

    name: str
    train: np.ndarray
    y_train: np.ndarray
    test: np.ndarray
    y_test: np.ndarray


def make_tasks(labels: dict, test_mask: np.ndarray, seed: int = SEED,
               max_classes: int = MAX_CLASSES, min_rows: int = MIN_ROWS,
               max_per_class: int = MAX_PER_CLASS) -> list[Task]:
    """The balanced one-vs-rest tasks of every label family (module docstring).

    Args:
      labels: family -> `(codes (n,), class names)`, UNLABELED rows left out.
      test_mask: boolean `(n,)`, the test rows.
    """
    rng = np.random.default_rng(seed)
    tasks = []
    for family in sorted(labels):
        codes, classes = labels[family]
        known = codes != UNLABELED
        train_codes, test_codes = codes[known & ~test_mask], codes[known & test_mask]
        n_train = np.bincount(train_codes, minlength=len(classes))
        n_test = np.bincount(test_codes, minlength=len(classes))
        usable = [c for c in range(len(classes))
                  if min(n_train[c], len(train_codes) - n_train[c], n_test[c],
                         len(test_codes) - n_test[c]) >= min_rows]
        usable.sort(key=lambda c: (-n_train[c], c))
        if len(classes) == 2:
            usable = sorted(usable, key=lambda c: (n_train[c], c))[:1]
        for c in usable[:max_classes]:
            split = {}
            for side, mask in (("train", ~test_mask), ("test", test_mask)):
                pos = np.flatnonzero(known & mask & (codes == c))
                neg = np.flatnonzero(known & mask & (codes != c))
                rows = balanced_indices(pos, neg, max_per_class, rng)
                split[side] = (rows, codes[rows] == c)
            tasks.append(Task(f"{family}={classes[c]}", *split["train"], *split["test"]))
    return tasks


def probe_tasks(sae, x: np.ndarray, tasks: list[Task], k_values=K_VALUES) -> dict:
    """Test accuracies of every task's k-sparse latent probes and raw probe.

    Args:
      sae: the SAE (`sae.encode`), or anything with `encode(rows) -> latents` and `d_in`.
      x: the raw rows `(n, ≥ d_in)`; the first `d_in` columns are the SAE's input.

    Returns:
      `{task name: {"k1": acc, ..., "raw": acc, "latents": [top max(k) latent ids],
      "n_train": rows, "n_test": rows}}`.
    """
    x = np.asarray(x[:, :sae.d_in], np.float32)
    if not tasks:
        return {}
    k_max = max(k_values)
    groups = np.zeros((len(x), 2 * len(tasks)), bool)
    for t, task in enumerate(tasks):
        groups[task.train[task.y_train], 2 * t] = True
        groups[task.train[~task.y_train], 2 * t + 1] = True
    means = class_means(sae.encode, x, groups)
    chosen = [top_latents(means[2 * t], means[2 * t + 1], k_max) for t in range(len(tasks))]
    columns = np.unique(np.concatenate(chosen))
    rows = np.unique(np.concatenate([np.concatenate([t.train, t.test]) for t in tasks]))
    f = np.zeros((len(x), len(columns)), np.float32)
    f[rows] = latent_columns(sae.encode, x[rows], columns)
    out = {}
    for task, top in zip(tasks, chosen):
        result = {}
        for k in k_values:
            cols = np.searchsorted(columns, top[:k])
            probe = fit_logistic(f[task.train][:, cols], task.y_train)
            result[f"k{k}"] = accuracy(probe.predict(f[task.test][:, cols]), task.y_test)
        probe = fit_logistic(x[task.train], task.y_train)
        result["raw"] = accuracy(probe.predict(x[task.test]), task.y_test)
        out[task.name] = {**result, "latents": top.tolist(), "n_train": int(len(task.train)),
                          "n_test": int(len(task.test))}
    return out


def summarize(per_task: dict, k_values=K_VALUES) -> dict:
    """The suite's flat metrics: mean test accuracy over tasks (None without tasks)."""
    names = [f"k{k}" for k in k_values] + ["raw"]
    return {f"probe_acc_{n}": (float(np.mean([r[n] for r in per_task.values()]))
                               if per_task else None) for n in names}


def add_arguments(parser) -> None:
    """The options `suite` reads (for `sae-jax evals`)."""
    parser.add_argument("--probe-rows", type=int, default=PROBE_ROWS, metavar="N",
                        help=f"held-out rows sampled for probing and absorption "
                             f"(default {PROBE_ROWS})")


def suite(sae, store, args) -> dict:
    """The evals suite (`sae-jax evals --suite probing`): `{"metrics", "higher_is_better",
    "detail"}`. Reads `args.corpus` and `args.probe_rows` when present. A store that cannot
    be labelled (not a harvest, corpus not found) gives None metrics and one warning line."""
    metrics_none = summarize({})
    higher = {name: True for name in metrics_none}
    try:
        sample = load_sample(store, sae.config.holdout,
                             getattr(args, "probe_rows", PROBE_ROWS) or PROBE_ROWS,
                             getattr(args, "corpus", None))
    except UserError as e:
        print(f"sae-jax: warning: probing skipped: {e}", file=sys.stderr)
        return {"metrics": metrics_none, "higher_is_better": higher,
                "detail": {"skipped": str(e)}}
    if sample.x.shape[1] != sae.row_width:
        raise UserError(f"store {store.path} has rows of width {sample.x.shape[1]}, the SAE "
                        f"reads {sae.row_width}")
    tasks = make_tasks(sample.labels, document_split(sample.docs, SEED))
    per_task = probe_tasks(sae, sample.x, tasks)
    detail = {"tasks": per_task, "k_values": list(K_VALUES), "n_rows": int(len(sample.x)),
              "n_documents": int(len(np.unique(sample.docs))), "corpus": sample.corpus,
              "families": {f: c for f, (_, c) in sample.labels.items()}}
    return {"metrics": summarize(per_task), "higher_is_better": higher, "detail": detail}
