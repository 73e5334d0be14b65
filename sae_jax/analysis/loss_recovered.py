"""Loss recovered: does a causal LM still predict the next token when the SAE stands in for
its site?

For a store harvested from a causal LM (`hooks.is_causal`), `loss_recovered` reloads the
store's model (`hooks.store_model`, checked to be the same weights), re-creates a sample of
the **held-out** sequences (`heldout.heldout_sequences`, framed with the model's BOS as
harvest framed them) and runs the model on them clean and with the value at the store's
site (`meta["site"]` of block `meta["layer"]`) replaced, at the spliced positions, by

* `spliced`: the SAE reconstruction x̂ = decode(encode(x));
* `zero_ablation`: zeros;
* `mean_ablation`: the mean activation of the store's training rows;
* `spliced_with_error`: x̂ + (x − x̂), which is x up to float rounding: a built-in sanity
  check of the splicing (its CE must equal the clean CE, its KL to clean must be ~0).

For a **transcoder** (`meta["pair"]`) what is replaced is block `layer`'s MLP output
(`pair.site` "mlp") or the whole block's output ("block"), by the transcoder's prediction from
that sub-layer's clean input (and by zeros, the mean target, the prediction plus its error).
For a **cross-layer transcoder** (`saes.clt`) the MLP output of every layer it spans is
replaced at once, each predicted from the MLP inputs of the patched pass itself
(`splice.CrossLayerSplice`); `layer` is then the list of layers.

**Spliced positions** are the tokens the store holds rows for (`hooks.spliced_positions`):
document tokens, not BOS or padding, unless the store was harvested with `keep_special`
(then BOS too). **Predicted positions** are those whose next token is a document token: the
cross-entropy never scores a prediction of BOS or of padding. `ce_<variant>` is the mean
next-token cross-entropy in nats over them, `kl_<variant>` the mean KL(clean ‖ variant) of
the next-token distributions over the same positions.

**Loss recovered** = (CE_zero − CE_spliced) / (CE_zero − CE_clean): SAELens's `ce_loss_score`
(`sae_lens/evals.py`, `get_downstream_reconstruction_metrics`: `(ce_loss_with_ablation −
ce_loss_with_sae) / (ce_loss_with_ablation − ce_loss_without_sae)`, its ablation being zeros).
1 means the SAE costs nothing downstream, 0 means it is no better than zeroing the site.
`loss_recovered_mean` takes mean ablation as the reference instead. Two differences from
SAELens, both deliberate: SAELens zero-ablates every position (BOS included) and drops a loss
term by the *input* token being special; here only the spliced positions are replaced, in
every variant alike, and a term is dropped by its *target* being BOS or padding.

All variants of a batch run in one jitted call (four copies of each sequence stacked on the
batch axis, next to the clean pass), with the batch split over the "data" axis of the model's mesh
and the weights over "model" as the model was loaded.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax.analysis.heldout import heldout_sequences
from sae_jax.analysis.moments import rows_mean
from sae_jax.analysis.splice import CrossLayerSplice, check_one_layer, clt_layers, is_clt
from sae_jax.batches import pad_rows, padded_batches
from sae_jax.errors import UserError
from sae_jax.lm.corpus import NO_POSITION
from sae_jax.lm.hooks import check_model_store, is_causal, spliced_positions, store_model
from sae_jax.sae import SAE

BATCH_SEQUENCES = 8  # sequences per model call (each call runs 5 passes of them)
VARIANTS = ("spliced", "zero_ablation", "mean_ablation", "spliced_with_error")


@functools.lru_cache(maxsize=8)
def _make_runner(arch, layer: int, site: str, mesh):
    """The jitted pass of one (model, layer, site): per-variant sums of next-token CE (clean
    first) and of KL to clean over the predicted positions, and the SAE's squared error and
    the squared deviation from the mean on the spliced positions (for its FVU)."""
    from sae_jax.lm import transformer

    pair = site in transformer.PAIR_SITES
    rows = NamedSharding(mesh, P("data", None))

    def run(params, sae, mean, ids, splice, target):
        n, d = ids.shape[0], arch.d_model
        captured = transformer.activations(arch, params, ids, layer, site)
        inp, clean_h = (captured[..., :d], captured[..., d:]) if pair else (captured, captured)
        clean_h = clean_h.astype(jnp.float32)
        x_hat = sae.reconstruct_raw(inp.reshape(-1, inp.shape[-1])).reshape(clean_h.shape)
        sel = splice[..., None]
        err = jnp.where(sel, jnp.square(clean_h - x_hat), 0.0).sum()
        dev = jnp.where(sel, jnp.square(clean_h - mean), 0.0).sum()

        def replace(h):  # h: (n * 4, T, d), the clean value in the 4 copies of each row
            hs = h.reshape(n, 4, *h.shape[1:])
            new = jnp.stack([
                x_hat,                                               # spliced
                jnp.zeros_like(x_hat),                               # zero ablation
                jnp.broadcast_to(mean, x_hat.shape),                 # mean ablation
                x_hat + (hs[:, 3].astype(jnp.float32) - x_hat),      # spliced with error
            ], axis=1).astype(h.dtype)
            return jnp.where(sel[:, None], new, hs).reshape(h.shape)

        hook = (layer, site, (lambda _inp, out: replace(out)) if pair else replace)
        clean = transformer.forward(arch, params, ids)
        return (*_scores(arch, params, ids, target, clean, hook, rows), err, dev)

    return jax.jit(run)


def _scores(arch, params, ids, target, clean_logits, hook, rows):
    """Per-variant sums of next-token CE (clean first) and of KL to clean over the predicted
    positions, the variants being the 4 stacked copies of each row run with `hook`."""
    from sae_jax.lm import transformer

    n = ids.shape[0]
    # Copies of a row next to each other: a device's slice of the stacked batch is the
    # copies of its own rows, so the splice needs no data moved between devices.
    stacked = jax.lax.with_sharding_constraint(jnp.repeat(ids, 4, axis=0), rows)
    clean = jax.nn.log_softmax(clean_logits[:, :-1])
    variants = transformer.forward(arch, params, stacked, hook=hook)
    variants = jax.nn.log_softmax(variants.reshape(n, 4, *variants.shape[1:])[:, :, :-1])
    nxt = ids[:, 1:, None]
    nll = -jnp.concatenate([jnp.take_along_axis(clean, nxt, -1)[:, None],
                            jnp.take_along_axis(variants, nxt[:, None], -1)], 1)[..., 0]
    kl = jnp.sum(jnp.exp(clean)[:, None] * (clean[:, None] - variants), -1)  # (n, 4, T-1)
    target = target[:, None]
    return jnp.where(target, nll, 0.0).sum((0, 2)), jnp.where(target, kl, 0.0).sum((0, 2))


@functools.lru_cache(maxsize=8)
def _make_clt_runner(arch, layers: tuple[int, ...], mesh):
    """`_make_runner`'s pass for a cross-layer transcoder: every MLP of `layers` replaced at
    once (`splice.CrossLayerSplice`, from the patched pass's own MLP inputs), by zeros, by
    each layer's mean target and by the prediction plus its error; the clean pass, hooked
    without changing anything, gives the CLT's error on clean inputs."""
    from sae_jax.lm import transformer

    position = {layer: p for p, layer in enumerate(layers)}
    rows = NamedSharding(mesh, P("data", None))

    def run(params, sae, mean, ids, splice, target):
        n, d = ids.shape[0], arch.d_model
        sel = splice[..., None]
        sums = {"err": 0.0, "dev": 0.0}
        clean_clt, spliced, with_error = (CrossLayerSplice(sae) for _ in range(3))

        def measure(i, inp, out):
            p, out32 = position[i], out.astype(jnp.float32)
            x_hat = clean_clt(p, inp)
            sums["err"] += jnp.where(sel, jnp.square(out32 - x_hat), 0.0).sum()
            sums["dev"] += jnp.where(sel, jnp.square(out32 - mean[p * d:(p + 1) * d]),
                                     0.0).sum()
            return out

        def replace(i, inp, out):  # (n·4, T, d): each row's 4 copies' own MLP in/out
            p = position[i]
            ins, outs = (a.reshape(n, 4, *a.shape[1:]) for a in (inp, out))
            x_err = with_error(p, ins[:, 3])
            new = jnp.stack([
                spliced(p, ins[:, 0]),
                jnp.zeros(outs[:, 0].shape, jnp.float32),
                jnp.broadcast_to(mean[p * d:(p + 1) * d], outs[:, 0].shape),
                x_err + (outs[:, 3].astype(jnp.float32) - x_err),
            ], axis=1).astype(out.dtype)
            return jnp.where(sel[:, None], new, outs).reshape(out.shape)

        clean = transformer.forward(arch, params, ids, hook=(layers, "mlp", measure))
        return (*_scores(arch, params, ids, target, clean, (layers, "mlp", replace), rows),
                sums["err"], sums["dev"])

    return jax.jit(run)


def loss_recovered(sae: SAE, store, n_sequences: int = 128, seed: int = 0,
                   corpus: None | str | os.PathLike | list = None,
                   batch_sequences: int = BATCH_SEQUENCES, mesh=None) -> dict:
    """Next-token cross-entropy and KL of a causal LM when the SAE's site is spliced /
    ablated on held-out sequences (see the module docstring).

    Args:
      sae: a trained SAE (or transcoder) on the store's site (`sae_jax.load`).
      store: an opened store made by `sae-jax harvest --model FOLDER`.
      n_sequences: held-out sequences to sample (all of them if there are fewer).
      seed: picks the sample; the result is a deterministic function of the arguments.
      corpus: the `--corpus` paths the store was harvested from (None: the stdlib default).
      batch_sequences: sequences per model call (memory/speed only, not the result beyond
        float rounding); rounded up to a multiple of the mesh's data axis.
      mesh: the `("data", "model")` mesh to load the model on (default: every device on data).

    Returns:
      A JSON-friendly dict: `ce_clean` and `ce_<variant>`, `kl_<variant>` for each of
      spliced/zero_ablation/mean_ablation/spliced_with_error, `loss_recovered` (vs zero
      ablation: SAELens's ce_loss_score), `loss_recovered_mean` (vs mean ablation),
      `fvu_spliced` (the SAE's FVU on the spliced tokens, against the store mean),
      `n_sequences`, `n_tokens_spliced`, `n_tokens_predicted`, `layer`, `site`, `seed`,
      `seq_len`, `n_heldout_documents`, `model`. A score whose reference variant does not
      raise the CE above clean is None.

    Raises:
      UserError: the store is not a causal-LM harvest, its model folder no longer holds its
        model, its corpus cannot be rebuilt or does not match the stored tokens, its width
        differs from the SAE's, or no whole held-out sequence exists.
    """
    if batch_sequences < 1:
        raise UserError(f"the LM batch (--lm-batch) must be at least 1, got {batch_sequences}")
    check_model_store(store, "loss recovered")
    meta = store.meta
    if not is_causal(meta):
        raise UserError(f"loss recovered needs a store harvested from a causal LM; store "
                        f"{store.path} comes from {meta.get('model')!r} (its eval reports "
                        "embedding fidelity instead)")
    if store.d_in != sae.row_width:
        raise UserError(f"store {store.path} has d_in={store.d_in}, but the SAE expects "
                        f"d_in={sae.row_width}")
    if sae.transcoder and not meta.get("pair"):
        raise UserError(f"this run is a transcoder, but store {store.path} holds no "
                        "input/output pairs")
    site = meta["pair"]["site"] if sae.transcoder else meta.get("site", "resid")
    check_one_layer(sae, meta)
    layer = list(clt_layers(sae, meta)) if is_clt(sae) else int(meta["layer"])
    model = store_model(meta, mesh=mesh)
    train_rows, heldout = store.split(sae.config.holdout)
    sample = heldout_sequences(store, heldout, model.tokenizer, model.specials, n_sequences,
                               seed, corpus)
    ids = sample.ids
    splice = spliced_positions(sample.mask, sample.positions,
                               bool(meta.get("keep_special", False)))
    target = sample.positions[:, 1:] != NO_POSITION  # the next token is a document token
    if not target.any():
        raise UserError(f"the held-out sequences of {store.path} have no token to predict")
    target_cols = slice(sae.d_in, None) if sae.transcoder else slice(None)

    everywhere = NamedSharding(model.mesh, P())
    rows = NamedSharding(model.mesh, P("data", None))
    mean = jax.device_put(np.asarray(rows_mean(train_rows, target_cols), np.float32),
                          everywhere)
    sae_here = jax.device_put(sae, everywhere)
    run = (_make_clt_runner(model.arch, tuple(layer), model.mesh) if is_clt(sae) else
           _make_runner(model.arch, layer, site, model.mesh))
    n_data = model.mesh.shape["data"]
    ce, kl, sq_err, sq_dev = np.zeros(5), np.zeros(4), 0.0, 0.0
    # Fill rows splice and predict nothing, so they add nothing to the sums.
    for b in padded_batches(len(ids), batch_sequences, ids, splice, target):
        size = -(-len(b.arrays[0]) // n_data) * n_data
        arrays = [jax.device_put(pad_rows(a, size), rows) for a in b.arrays]
        c, k, err, dev = jax.device_get(run(model.params, sae_here, mean, *arrays))
        ce += np.asarray(c, np.float64)
        kl += np.asarray(k, np.float64)
        sq_err += float(err)
        sq_dev += float(dev)
    n_predicted = int(target.sum())
    ce, kl = ce / n_predicted, kl / n_predicted

    def recovered(ablated: float) -> float | None:
        ref = ablated - ce[0]
        return float((ablated - ce[1]) / ref) if ref > 0 else None

    out = {"n_sequences": int(len(ids)), "n_tokens_spliced": int(splice.sum()),
           "n_tokens_predicted": n_predicted, "layer": layer, "site": site, "seed": int(seed),
           "seq_len": int(meta["seq_len"]), "n_heldout_documents": sample.n_documents,
           "model": meta.get("model"), "ce_clean": float(ce[0])}
    out.update({f"ce_{name}": float(ce[i + 1]) for i, name in enumerate(VARIANTS)})
    out.update({f"kl_{name}": float(kl[i]) for i, name in enumerate(VARIANTS)})
    out["loss_recovered"] = recovered(ce[2])
    out["loss_recovered_mean"] = recovered(ce[3])
    out["fvu_spliced"] = sq_err / sq_dev if sq_dev > 0 else None
    return out
