"""What the model loses when the SAE stands in for its layer, as `sae-jax eval` reports it:
embedding fidelity for a MiniLM store (`fidelity`), next-token loss recovered for a
causal-LM store (`loss_recovered`). One dispatcher that eval, the evals core suite, the
random baselines and `prune` share, so each measures the same thing the same way."""

from __future__ import annotations

import sys

from sae_jax.errors import UserError
from sae_jax.sae import SAE

LM_BATCH = 8  # sequences per causal-LM call for loss recovered (`loss_recovered.BATCH_SEQUENCES`)
FIDELITY_SEQUENCES = 128  # held-out sequences the downstream measure runs on, by default


def add_arguments(parser) -> None:
    """The options `downstream` reads, for every command that measures it (eval, evals)."""
    parser.add_argument("--fidelity-sequences", type=int, default=FIDELITY_SEQUENCES,
                        help="held-out sequences for downstream fidelity (MiniLM) or loss "
                             f"recovered (causal LMs) (default {FIDELITY_SEQUENCES}; 0 skips "
                             "it with a warning)")
    parser.add_argument("--corpus", nargs="+", metavar="PATH",
                        help="the corpus the store was harvested from, if not the default")
    parser.add_argument("--lm-batch", type=int, default=LM_BATCH, metavar="N",
                        help="sequences per causal-LM call for loss recovered; each call holds "
                             "the logits of 5 passes (clean and 4 spliced), so lower it for a "
                             f"large vocabulary (default {LM_BATCH})")


def downstream(sae: SAE, store, args, mesh=None, others: dict | None = None) -> dict:
    """For a causal-LM store `lm_loss` (`loss_recovered.loss_recovered`) and its
    `loss_recovered` number, for a MiniLM store `fidelity` (`fidelity.downstream_fidelity`);
    None with one warning line where it cannot be measured (not a harvested store, no corpus,
    no model). `args` carries `fidelity_sequences`, `corpus` and (optionally) `lm_batch`.

    With `others` (`{name: SAE}`, the random baselines) and a measure that ran, also
    `others`: `{name: recovered(...)}` on the same sequences (MiniLM: spliced in the same
    model calls, one more pass each; a causal LM: one `loss_recovered` run each)."""
    from sae_jax.lm.hooks import is_causal

    if is_causal(store.meta):
        from sae_jax.analysis.loss_recovered import loss_recovered

        def measure(s: SAE) -> dict:
            return loss_recovered(s, store, n_sequences=args.fidelity_sequences,
                                  corpus=args.corpus, mesh=mesh,
                                  batch_sequences=getattr(args, "lm_batch", LM_BATCH))

        try:
            lm = measure(sae)
        except UserError as e:
            print(f"sae-jax: warning: loss recovered skipped: {e}", file=sys.stderr)
            return {"lm_loss": None, "loss_recovered": None}
        out = {"lm_loss": lm, "loss_recovered": lm["loss_recovered"]}
        if others:
            out["others"] = {name: {"loss_recovered": measure(o)["loss_recovered"]}
                             for name, o in others.items()}
        return out
    from sae_jax.analysis.fidelity import downstream_fidelity

    try:
        fidelity = downstream_fidelity(sae, store, n_sequences=args.fidelity_sequences,
                                       corpus=args.corpus, others=others)
    except UserError as e:  # not a harvested store, or its corpus cannot be rebuilt
        print(f"sae-jax: warning: fidelity skipped: {e}", file=sys.stderr)
        return {"fidelity": None}
    spliced = fidelity.pop("others", None)
    out = {"fidelity": fidelity}
    if spliced is not None:
        out["others"] = {name: {"fidelity_recovered": r["fidelity_recovered"]}
                         for name, r in spliced.items()}
    return out


def recovered(result: dict) -> dict[str, float | None]:
    """The headline number of a `downstream` result, flat: `{"fidelity_recovered": ...}`
    for MiniLM, `{"loss_recovered": ...}` for a causal LM (None where it did not run)."""
    if "loss_recovered" in result:
        return {"loss_recovered": result["loss_recovered"]}
    fidelity = result.get("fidelity")
    return {"fidelity_recovered": None if fidelity is None else fidelity["fidelity_recovered"]}
