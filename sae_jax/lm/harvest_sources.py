"""Multi-source harvests: several activations of each token side by side in one store row.

* **Several models** (`--model A --model B`) at one layer and site: every model runs on the
  SAME token batches, so row i is `[x_A | x_B]` of one token: what a crosscoder diffs. The
  models must share a vocabulary (checked before anything is written); the first model's
  tokenizer and framing tokens make the sequences.
* **Several layers of one model** (`--layers 1,3,5`): one source per layer, all from ONE
  forward pass. With `--pair mlp` it is a **cross-layer transcoder store**: row =
  `[mlp_in.l1 | … | mlp_in.lL | mlp_out.l1 | … | mlp_out.lL]`, `meta["pair"]` =
  `{"d_in": L·d, "d_out": L·d, "site": "mlp"}` (the transcoder machinery reads its input
  and target halves), `meta["layers"]` = `[l1..lL]`.

`meta["sources"]` lists the sources in row order: `name`, width `d`, `model`, `hash` (the
SHA-256 of its weights: the file's, or for several weight files that of their
"name hash" lines), `layer`, `site`, `path` (the model folder; None for the packaged MiniLM).
The top-level meta is the first model's, as a single harvest writes it, so token ids,
positions and the tokenizer read as usual; a multi-layer store has `layers` instead of
`layer`, and commands that re-run the model at one hook refuse a multi-source store
(`hooks.check_model_store`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jax.numpy as jnp
from jax.tree_util import Partial

from sae_jax.data.importers import checked_names
from sae_jax.errors import UserError
from sae_jax.lm import harvest_models
from sae_jax.lm.harvest_models import Source


def is_minilm(model: str) -> bool:
    """The packaged MiniLM, or a folder with its (BERT) architecture."""
    return model == "minilm" or harvest_models.is_minilm_folder(model)


def model_plan(model: str, layer: int, site: str | None, pair: str | None, seq_len: int,
               keep_special: bool, max_tokens: int) -> tuple[dict, int]:
    """One model's store meta and row width at one hook, from its config alone."""
    if model == "minilm":
        return harvest_models.minilm_plan(layer, pair, seq_len, keep_special, max_tokens)
    if harvest_models.is_minilm_folder(model):
        if site is not None:
            raise UserError("--site is for causal LMs; a MiniLM folder stores the residual "
                            "stream after --layer")
        from sae_jax.lm import minilm

        minilm.check_config(model)
        harvest_models.check_minilm_vocab(model)
        return harvest_models.minilm_plan(layer, pair, seq_len, keep_special, max_tokens,
                                          folder=model)
    return harvest_models.causal_plan(model, layer, site, pair, seq_len, keep_special,
                                      max_tokens)


def model_source(model: str, layer: int, site: str | None, pair: str | None,
                 model_dtype: str | None, mesh) -> Source:
    """One model loaded for one hook (`model_plan` first)."""
    if is_minilm(model):
        return harvest_models.minilm_source(layer, pair, None if model == "minilm" else model)
    return harvest_models.causal_source(model, layer, site, pair, model_dtype, mesh)


def _vocabulary(model: str) -> dict:
    from sae_jax.lm import hf, minilm

    tokenizer = minilm.load_tokenizer() if is_minilm(model) else hf.load_tokenizer(model)
    return tokenizer.get_vocab()


def default_names(models: list[str]) -> list[str]:
    """Each model's folder name ("minilm" for the packaged one), or a, b, c … when two are
    equal."""
    names = [Path(m).name if m != "minilm" else "minilm" for m in models]
    return names if len(set(names)) == len(names) else [chr(97 + i) for i in range(len(names))]


def weights_hash(model: str, loaded_meta: dict) -> str:
    """The source's `hash`: SHA-256 of its one weight file, or of its files' "name hash"
    lines (`loaded_meta["model_sha256"]`, or the packaged MiniLM's file)."""
    from sae_jax.lm import hf, minilm

    files = loaded_meta.get("model_sha256") or hf.weights_sha256(minilm.model_dir())
    if len(files) == 1:
        return next(iter(files.values()))
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _entry(name: str, d: int, model: str, meta: dict, loaded: dict, layer: int,
           site: str) -> dict:
    return {"name": name, "d": d, "model": loaded.get("model", meta.get("model")),
            "hash": weights_hash(model, loaded), "layer": layer, "site": site,
            "path": None if model == "minilm" else str(Path(model).resolve())}


def _side_by_side(fns, input_ids, attention_mask):
    return jnp.concatenate([f(input_ids, attention_mask).astype(jnp.float32) for f in fns], -1)


# ---------------------------------------------------------------------------- several models


def models_plan(models: list[str], names: list[str] | None, layer: int, site: str | None,
                seq_len: int, keep_special: bool, max_tokens: int):
    """`(meta, width, load)` of a harvest of several models at one hook; `load(mesh,
    model_dtype)` gives the `Source` whose rows are theirs side by side and the `sources`
    meta. Refuses models of different vocabularies before anything is written."""
    names = checked_names(default_names(models) if names is None else list(names), len(models))
    plans = [model_plan(m, layer, site, None, seq_len, keep_special, max_tokens)
             for m in models]
    vocab = _vocabulary(models[0])
    for m in models[1:]:
        if _vocabulary(m) != vocab:
            raise UserError(f"models {models[0]} and {m} have different tokenizers "
                            "(vocabularies); a multi-model harvest runs every model on the "
                            "same tokens")
    meta = dict(plans[0][0])

    def load(mesh, model_dtype) -> tuple[Source, list[dict]]:
        loaded = [model_source(m, layer, site, None, model_dtype, mesh) for m in models]
        sources = [_entry(n, width, m, plan, s.meta, layer,
                          plan.get("site") or "resid")
                   for n, m, (plan, width), s in zip(names, models, plans, loaded)]
        first = loaded[0]
        return Source(Partial(_side_by_side, [s.activations for s in loaded]),
                      first.tokenizer, first.specials, first.meta), sources

    return meta, sum(width for _, width in plans), load


# ---------------------------------------------------------------------------- several layers


def _minilm_layers(params, input_ids, attention_mask, *, layers: tuple[int, ...], pair: bool):
    from sae_jax.lm import minilm

    if pair:
        io = minilm.mlp_io_layers(params, input_ids, attention_mask, layers)
        return jnp.concatenate([i for i, _ in io] + [o for _, o in io], -1)
    states = minilm.forward(params, input_ids, attention_mask, n_layers=max(layers))
    return jnp.concatenate([states[layer] for layer in layers], -1)


def _causal_layers(params, input_ids, attention_mask, *, arch, layers: tuple[int, ...],
                   site: str):
    del attention_mask  # causal attention: right padding never reaches a real token
    from sae_jax.lm import transformer

    got = transformer.forward(arch, params, input_ids,
                              capture=tuple((layer, site) for layer in layers))
    if site != "mlp":
        return jnp.concatenate(got, -1)
    halves = [jnp.split(g, 2, axis=-1) for g in got]  # each: MLP input ++ output
    return jnp.concatenate([i for i, _ in halves] + [o for _, o in halves], -1)


@functools.lru_cache(maxsize=32)
def _layers_fn(layers: tuple[int, ...], pair: bool, arch=None, site: str = "resid"):
    # One function object per hook set: jit caches keyed on it hit across harvests.
    if arch is None:
        return functools.partial(_minilm_layers, layers=layers, pair=pair)
    return functools.partial(_causal_layers, arch=arch, layers=layers,
                             site="mlp" if pair else site)


def check_layers(layers: list[int]) -> tuple[int, ...]:
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
        raise UserError(f"--layers must be increasing layer numbers, e.g. 1,3,5; got "
                        f"{','.join(map(str, layers))}")
    return tuple(layers)


def layers_plan(model: str, layers: list[int], site: str | None, pair: str | None,
                seq_len: int, keep_special: bool, max_tokens: int):
    """`(meta, width, load)` of a harvest of several layers of one model from one pass:
    one source per layer, or with `pair="mlp"` the cross-layer transcoder store (module
    docstring)."""
    layers = check_layers(layers)
    if pair not in (None, "mlp"):
        raise UserError(f"--layers takes --pair mlp (a cross-layer transcoder store), not "
                        f"--pair {pair}")
    plans = [model_plan(model, layer, site, pair, seq_len, keep_special, max_tokens)
             for layer in layers]
    meta, width = dict(plans[0][0]), plans[0][1]
    d = width // 2 if pair else width
    del meta["layer"]
    meta["layers"] = list(layers)
    where = "mlp" if pair else (meta.get("site") or "resid")
    meta["hook"] = f"{where} of layers {','.join(map(str, layers))}, side by side: " + (
        "every MLP input, then every MLP output" if pair else plans[0][0]["hook"])
    if pair:
        meta["pair"] = {"d_in": len(layers) * d, "d_out": len(layers) * d, "site": "mlp"}
        parts = [(f"mlp_in.{layer}", layer, "mlp_in") for layer in layers] + \
                [(f"mlp_out.{layer}", layer, "mlp_out") for layer in layers]
    else:
        parts = [(f"layer{layer}", layer, where) for layer in layers]

    def load(mesh, model_dtype) -> tuple[Source, list[dict]]:
        if is_minilm(model):
            folder = None if model == "minilm" else model
            params, tokenizer, loaded = harvest_models.load_minilm(folder)
            source = Source(Partial(_layers_fn(layers, bool(pair)), params), tokenizer, None,
                            loaded)
        else:
            m, loaded = harvest_models.load_causal(model, model_dtype, mesh)
            fn = _layers_fn(layers, bool(pair), m.arch, where)
            source = Source(Partial(fn, m.params), m.tokenizer, m.specials, loaded)
        sources = [_entry(name, d, model, meta, loaded, layer, s) for name, layer, s in parts]
        return source, sources

    return meta, len(parts) * d, load
