"""Downstream fidelity: does the model still work when the SAE stands in for its layer?

For a store harvested from all-MiniLM-L6-v2 (`sae-jax harvest`), `downstream_fidelity`
re-creates a sample of the **held-out** sequences (`heldout.heldout_sequences`: the store's
tail, never trained on), runs MiniLM on them, and compares the
sentence embedding (mean-pooled, L2-normalised last layer) of the clean run with runs in
which the residual stream after the harvested layer is replaced, at the spliced positions,
by

* `spliced`: the SAE reconstruction x̂ = decode(encode(x));
* `zero_ablation`: zeros;
* `mean_ablation`: the mean activation of the store's training rows;
* `spliced_with_error`: x̂ + (x − x̂), which is x up to float32 rounding: a built-in sanity
  check of the splicing (its cosine to clean must be 1 within float tolerance).

For a **transcoder** (a store of `harvest --pair` rows) what is replaced is the output of
block `layer`'s MLP (`--pair mlp`) or of the whole block (`--pair block`): by the
transcoder's prediction from that sub-layer's clean input, by zeros, by the mean target, and
by the prediction plus its error. Everything downstream of the block is the model's own.
For a **cross-layer transcoder** (`saes.clt`, a multi-layer MLP pair store) the MLP output of
*every* layer it spans is replaced at once, each by the CLT's prediction from the MLP inputs
of the patched pass itself (`splice.CrossLayerSplice`); `layer` is then the list of layers.

**Spliced positions** are exactly the tokens the store holds rows for: document tokens
only, *not* `[CLS]`, `[SEP]` or padding (the SAE never saw those; they are left unchanged),
unless the store was harvested with `keep_special`, in which case `[CLS]`/`[SEP]` are
spliced too. Padding is never touched (it is masked out of attention and pooling anyway).

Loss of a run = 1 − cos(embedding, clean embedding), averaged over the sequences (clean = 0).
**Fidelity recovered** = (L_ablated − L_spliced) / (L_ablated − L_clean) = 1 − L_spliced /
L_ablated, with mean ablation as the reference (`fidelity_recovered`) and with zero ablation
(`fidelity_recovered_zero`): 1 means the SAE loses nothing downstream, 0 means it is no
better than ablating the layer.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.analysis.heldout import heldout_sequences
from sae_jax.analysis.moments import rows_mean
from sae_jax.analysis.splice import CrossLayerSplice, check_one_layer, clt_layers, is_clt
from sae_jax.batches import padded_batches
from sae_jax.errors import UserError
from sae_jax.lm.corpus import Specials
from sae_jax.lm.hooks import check_model_store, is_causal, layer_state, spliced_positions
from sae_jax.sae import SAE
from sae_jax.vectors import unit_vectors

BATCH_SEQUENCES = 16  # sequences per model call (each call runs 5 variants of them)
VARIANTS = ("spliced", "zero_ablation", "mean_ablation", "spliced_with_error")


@functools.lru_cache(maxsize=8)
def _make_runner(layer: int, site: str = "resid"):
    """The jitted spliced pass. `site` "resid" splices the residual stream after `layer`;
    "mlp"/"block" (a transcoder) replace block `layer`'s MLP / whole-block output with the
    transcoder's prediction from that sub-layer's input."""
    from sae_jax.lm import minilm

    def run(params, sae, mean, ids, mask, splice, others=()):
        """Embeddings (5 + len(others), n, 384): clean, then `VARIANTS`, then each of
        `others` spliced; and the batch's SAE sq-error sums."""
        n = ids.shape[0]
        if site == "resid":
            inp = clean_h = layer_state(params, ids, mask, layer=layer)
        else:
            inp, clean_h = minilm.sublayer_io(params, ids, mask, layer, site)
        flat = inp.reshape(-1, inp.shape[-1])
        x_hat = sae.reconstruct_raw(flat).reshape(clean_h.shape)
        sel = splice[..., None]
        err = jnp.where(sel, jnp.square(clean_h - x_hat), 0.0).sum()
        dev = jnp.where(sel, jnp.square(clean_h - mean.astype(jnp.float32)), 0.0).sum()
        n_var = 4 + len(others)

        def replace(h):  # h: (n_var·n, L, d), the clean stream of the stacked copies
            hs = h.reshape(n_var, n, *h.shape[1:])
            new = jnp.stack([
                x_hat,                              # spliced
                jnp.zeros_like(x_hat),              # zero ablation
                jnp.broadcast_to(mean.astype(h.dtype), x_hat.shape),  # mean ablation
                x_hat + (hs[3] - x_hat),            # spliced with the error term
                *[o.reconstruct_raw(flat).reshape(clean_h.shape) for o in others],
            ])
            return jnp.where(sel[None], new, hs).reshape(h.shape)

        tile = lambda a: jnp.concatenate([a] * n_var)  # noqa: E731
        clean = minilm.embed(params, ids, mask)
        hook = ((layer, replace) if site == "resid" else
                (layer, lambda _inp, out: replace(out), site))
        variants = minilm.embed(params, tile(ids), tile(mask), replace=hook)
        return jnp.concatenate([clean[None], variants.reshape(n_var, n, -1)]), err, dev

    return jax.jit(run)


@functools.lru_cache(maxsize=8)
def _make_clt_runner(layers: tuple[int, ...]):
    """`_make_runner`'s pass for a cross-layer transcoder: every MLP of `layers` replaced at
    once (`splice.CrossLayerSplice`: each layer's latents read the patched pass's MLP input),
    by zeros, by each layer's mean target, and by the prediction plus its error. The clean
    pass, hooked without changing anything, gives the CLT's error on clean inputs."""
    from sae_jax.lm import minilm

    position = {layer: p for p, layer in enumerate(layers)}

    def run(params, sae, mean, ids, mask, splice, others=()):
        n, d = ids.shape[0], sae.d_in // len(layers)
        n_var = 4 + len(others)
        sel = splice[..., None]
        sums = {"err": 0.0, "dev": 0.0}
        clean_clt = CrossLayerSplice(sae)

        def measure(i, inp, out):
            p = position[i]
            x_hat = clean_clt(p, inp)
            sums["err"] += jnp.where(sel, jnp.square(out - x_hat), 0.0).sum()
            sums["dev"] += jnp.where(sel, jnp.square(out - mean[p * d:(p + 1) * d]), 0.0).sum()
            return out

        spliced, with_error, *spliced_others = (CrossLayerSplice(s) for s in (sae, sae, *others))

        def replace(i, inp, out):  # (n_var·n, L, d): the stacked copies' own MLP in/out
            p = position[i]
            ins, outs = (a.reshape(n_var, n, *a.shape[1:]) for a in (inp, out))
            x_err = with_error(p, ins[3])
            new = jnp.stack([
                spliced(p, ins[0]),
                jnp.zeros_like(outs[0]),
                jnp.broadcast_to(mean[p * d:(p + 1) * d], outs[0].shape),
                x_err + (outs[3] - x_err),
                *[o(p, ins[4 + j]) for j, o in enumerate(spliced_others)],
            ])
            return jnp.where(sel[None], new, outs).reshape(out.shape)

        tile = lambda a: jnp.concatenate([a] * n_var)  # noqa: E731
        clean = minilm.embed(params, ids, mask, replace=(layers, measure, "mlp"))
        variants = minilm.embed(params, tile(ids), tile(mask), replace=(layers, replace, "mlp"))
        return (jnp.concatenate([clean[None], variants.reshape(n_var, n, -1)]), sums["err"],
                sums["dev"])

    return jax.jit(run)


def downstream_fidelity(sae: SAE, store, n_sequences: int = 128, seed: int = 0,
                        corpus: None | str | os.PathLike | list = None,
                        batch_sequences: int = BATCH_SEQUENCES,
                        per_sequence: bool = False, others: dict | None = None) -> dict:
    """Cosine similarity of MiniLM sentence embeddings to the clean run when the SAE's layer
    is spliced / ablated on held-out sequences (see the module docstring).

    Args:
      sae: a trained SAE on the store's layer (raw activations, as `sae_jax.load` gives).
      store: an opened store (`store.open_store`) made by `sae-jax harvest`.
      n_sequences: held-out sequences to sample (all of them if there are fewer).
      seed: picks the sample; the result is a deterministic function of the arguments.
      corpus: the `--corpus` paths the store was harvested from (None: the stdlib default).
      batch_sequences: sequences per model call (memory/speed only, not the result beyond
        float rounding).
      per_sequence: also return `per_sequence`: per sampled sequence its `doc`, `text` and
        `loss_<name>` (1 − cos) for each variant (what `coverage` reports per sequence).
      others: `{name: SAE}` of the same layer (the random baselines) spliced in the same
        model calls, on the same sequences: one more pass each instead of a whole run.

    Returns:
      A JSON-friendly dict: `n_sequences`, `n_tokens_spliced`, `layer`, `seed`, for each of
      clean/spliced/zero_ablation/mean_ablation/spliced_with_error `cos_<name>` (mean cosine
      to clean) and `loss_<name>` (mean 1 − cos), `cos_min_spliced_with_error`,
      `fidelity_recovered` (vs mean ablation), `fidelity_recovered_zero` (vs zero ablation),
      and `fvu_spliced` (the SAE's FVU on the spliced tokens, against the store mean);
      with `others`, `others: {name: {cos_spliced, loss_spliced, fidelity_recovered,
      fidelity_recovered_zero}}` against the same clean and ablated runs.

    Raises:
      UserError: the store is not a MiniLM harvest, its corpus cannot be rebuilt or does not
        match the stored tokens, its width differs from the SAE's, or no whole held-out
        sequence exists.
    """
    from sae_jax.lm import minilm

    check_model_store(store)
    if is_causal(store.meta):
        raise UserError(f"store {store.path} comes from a causal LM: embedding fidelity is "
                        "for MiniLM stores; use loss_recovered.loss_recovered")
    if store.d_in != sae.row_width:
        raise UserError(f"store {store.path} has d_in={store.d_in}, but the SAE expects "
                        f"d_in={sae.row_width}")
    site = store.meta["pair"]["site"] if sae.transcoder else "resid"
    if is_clt(sae):
        layers = clt_layers(sae, store.meta)
        layer, run = list(layers), _make_clt_runner(layers)
    else:
        check_one_layer(sae, store.meta)
        layer = int(store.meta["layer"])
        run = _make_runner(layer, site)
    seq_len = int(store.meta["seq_len"])
    keep_special = bool(store.meta.get("keep_special", False))
    train_rows, heldout = store.split(sae.config.holdout)
    tokenizer = minilm.load_tokenizer()
    sample = heldout_sequences(store, heldout, tokenizer, Specials.of(tokenizer), n_sequences,
                               seed, corpus)
    ids, mask, positions, doc_of = sample.ids, sample.mask, sample.positions, sample.docs

    splice = spliced_positions(mask, positions, keep_special)
    target = slice(sae.d_in, None) if sae.transcoder else slice(None)
    mean = jnp.asarray(rows_mean(train_rows, target), jnp.float32)
    params = minilm.load_params()
    n = len(ids)
    embs, sq_err, sq_dev = [], 0.0, 0.0
    # Fill rows splice nothing, so they add nothing to the error sums.
    extra = tuple((others or {}).values())
    for b in padded_batches(n, batch_sequences, ids, mask, splice, attend=1):
        e, err, dev = run(params, sae, mean, *b.arrays, extra)
        embs.append(np.asarray(e, np.float64)[:, :b.n_valid])
        sq_err += float(err)
        sq_dev += float(dev)
    emb = unit_vectors(np.concatenate(embs, axis=1))  # (5 + len(others), n, 384)
    cos = np.einsum("vnd,nd->vn", emb, emb[0])
    names = ("clean",) + VARIANTS
    loss = {name: float(np.mean(1.0 - cos[i])) for i, name in enumerate(names)}

    def recovered(ablated: str, spliced: float | None = None) -> float | None:
        ref = loss[ablated] - loss["clean"]
        spliced = loss["spliced"] if spliced is None else spliced
        return (loss[ablated] - spliced) / ref if ref > 0 else None

    out = {"n_sequences": int(n), "n_tokens_spliced": int(splice.sum()), "layer": layer,
           "seed": int(seed), "seq_len": seq_len, "n_heldout_documents": sample.n_documents}
    for i, name in enumerate(names):
        out[f"cos_{name}"] = float(np.mean(cos[i]))
    for name in names:
        out[f"loss_{name}"] = loss[name]
    out["cos_min_spliced_with_error"] = float(np.min(cos[4]))
    out["fidelity_recovered"] = recovered("mean_ablation")
    out["fidelity_recovered_zero"] = recovered("zero_ablation")
    out["fvu_spliced"] = sq_err / sq_dev if sq_dev > 0 else None
    if others:
        out["others"] = {}
        for j, name in enumerate(others):
            spliced = float(np.mean(1.0 - cos[len(names) + j]))
            out["others"][name] = {
                "cos_spliced": float(np.mean(cos[len(names) + j])), "loss_spliced": spliced,
                "fidelity_recovered": recovered("mean_ablation", spliced),
                "fidelity_recovered_zero": recovered("zero_ablation", spliced)}
    if per_sequence:
        out["per_sequence"] = {
            "doc": doc_of.tolist(),
            "text": [tokenizer.decode(ids[i][mask[i] == 1].tolist()) for i in range(n)],
            **{f"loss_{name}": (1.0 - cos[i]).tolist() for i, name in enumerate(names)}}
    return out
