"""The LM hook contract: which model a store's rows come from, where in it an SAE reads and
writes, and on which tokens. Harvest writes by it; eval, steer, features and the audit read
by it.

* **Model.** A store made by `sae-jax harvest` records `source: harvest`, `model:
  MODEL_NAME`, the `layer`, the `seq_len` and each row's `(document, position)`
  (`check_model_store`), so its tokens can be re-created and the model re-run.
* **Hook point.** The residual stream after block `layer` of all-MiniLM-L6-v2 (0 = the
  embedding LayerNorm output, 1..6 = blocks): `layer_state` computes it (only the first
  `layer` blocks run); `embedding_from(layer)` is the model's output (the sentence
  embedding) computed from it; `minilm.forward(..., replace=(layer, fn))` splices into it.
  A transcoder reads one activation and writes another, so the commands that splice one
  residual stream refuse it (`check_not_transcoder`).
* **Positions.** An SAE stands in for the tokens it was trained on: document tokens, not
  `[CLS]`, `[SEP]` or padding, unless the store was harvested with `keep_special` (then
  `[CLS]`/`[SEP]` too); never padding. `spliced_positions` says which from a store's
  positions, `steered_positions` from token ids (texts that are not in a store).
* **Fixed-shape batches.** A model pass over many sequences runs in padded batches of one
  shape (`model_pass`, built on `sae_jax.batches.padded_batches`), so it compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from sae_jax.batches import padded_batches
from sae_jax.errors import UserError
from sae_jax.lm.corpus import NO_POSITION, Specials

MODEL_NAME = "all-MiniLM-L6-v2"
NOT_MODEL_BACKED = "needs a store harvested with sae-jax harvest"
MODEL_BATCH = 64  # sequences per model call in `model_pass`

OutputFn = Callable[[object, jax.Array, jax.Array], jax.Array]
"""`output_fn(model_params, h (n, T, d), mask (n, T)) -> (n, m)`: the model's output computed
from the residual stream at the hooked layer."""


def check_model_store(store, what: str = "fidelity", tokens: bool = False) -> None:
    """Refuses a store the model cannot be re-run for: not a MiniLM or causal-LM harvest, or
    missing its layer, sequence length or positions (and token ids, with `tokens`)."""
    meta = store.meta
    sources = meta.get("sources") or []
    if len(sources) > 1:
        raise UserError(f"{what} re-runs one model at one hook; store {store.path} holds "
                        f"{len(sources)} sources side by side "
                        f"({', '.join(str(s.get('name')) for s in sources)})")
    if (meta.get("source") != "harvest"
            or (meta.get("model") != MODEL_NAME and not is_causal(meta))
            or "layer" not in meta or "seq_len" not in meta or store.positions is None
            or (tokens and store.token_ids is None)):
        raise UserError(f"{what} {NOT_MODEL_BACKED} (store {store.path} has source "
                        f"{meta.get('source')!r}, model {meta.get('model')!r})")


def is_causal(meta: dict) -> bool:
    """A store harvested from a causal LM folder (its meta names `model_path`)."""
    return "model_path" in meta


def model_identity(folder) -> dict:
    """What a store records to recognise its causal LM later: the config's model_type and
    each weight file's size (cheap to check on every open; the SHA-256 is recorded too)."""
    from sae_jax.lm import families, hf

    return {"model_type": families.text_config(hf.read_config(folder)).get("model_type"),
            "weight_files": {p.name: p.stat().st_size for p in hf.weight_files(folder)}}


def store_model(meta: dict, mesh=None, dtype=None):
    """The causal LM a store was harvested from (`sae_jax.lm.causal.CausalLM`), checked to
    be the same model: a folder moved, or holding other weights, is a one-line error."""
    from sae_jax.lm import causal

    folder = meta["model_path"]
    try:
        found = model_identity(folder)
    except UserError as e:
        raise UserError(f"cannot reopen the model this store was harvested from: {e}") \
            from None
    recorded = {k: meta.get(k) for k in found}
    if found != recorded:
        raise UserError(f"the model folder {folder} no longer holds the model this store was "
                        f"harvested from (recorded {recorded}, found {found})")
    return causal.load(folder, dtype=meta.get("model_dtype", dtype), mesh=mesh)


def store_tokenizer(meta: dict):
    """The tokenizer a store's token ids come from: its causal LM's, or MiniLM's."""
    if is_causal(meta):
        from sae_jax.lm import hf

        return hf.load_tokenizer(meta["model_path"])
    from sae_jax.lm import minilm

    return minilm.load_tokenizer()


def check_not_transcoder(cfg, what: str) -> None:
    """Steering, feature reading and the audit need an SAE on the residual stream: a
    transcoder reads one activation (e.g. an MLP's input) and writes another."""
    if getattr(cfg, "transcoder", False):
        raise UserError(f"{what} needs an SAE on the residual stream; this run is a "
                        "transcoder (it reads one activation and writes another)")


# ----------------------------------------------------------------------------------------
# The hook point


def layer_state(params, input_ids, attention_mask, *, layer: int) -> jax.Array:
    """MiniLM's residual stream after `layer`, `(n, L, 384)`, running only blocks 1..layer."""
    from sae_jax.lm import minilm

    return minilm.forward(params, input_ids, attention_mask, n_layers=layer)[layer]


@functools.lru_cache(maxsize=None)
def _layer_fn(layer: int):
    # One function object per layer: a `Partial` over it has the same tree structure on
    # every call, so `jit` caches built on it hit instead of retracing.
    return functools.partial(layer_state, layer=layer)


def minilm_activations(layer: int, params: dict | None = None) -> Partial:
    """The residual stream after `layer` (0 = embeddings, 1..6 = blocks) as an
    `activations_fn(input_ids, attention_mask)` (what `harvest` and `features` take), with
    the weights as a `Partial` argument rather than constants baked into the program.

    Args:
      layer: 0..6.
      params: from `minilm.load_params()` (default: load the packaged weights).
    """
    from sae_jax.lm import minilm

    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= minilm.N_LAYERS:
        raise UserError(f"layer must be in 0..{minilm.N_LAYERS} for minilm, got {layer}")
    params = minilm.load_params() if params is None else params
    return Partial(_layer_fn(layer), params)


@functools.lru_cache(maxsize=8)
def embedding_from(layer: int) -> OutputFn:
    """MiniLM's sentence embedding computed from the residual stream `h` after `layer`.

    The hook ignores what layers 0..layer computed and substitutes `h`, so XLA drops those
    layers as dead code and a call costs only the blocks after `layer`."""
    from sae_jax.lm import minilm

    def output(params, h, mask):
        ids = jnp.zeros(mask.shape, jnp.int32)  # only read by the dead layers below `layer`
        return minilm.embed(params, ids, mask, replace=(layer, lambda _: h))

    return output


@functools.lru_cache(maxsize=16)
def _jitted(fn, **static):
    return jax.jit(functools.partial(fn, **static))


def model_pass(fn, params, ids: np.ndarray, mask: np.ndarray, size: int = MODEL_BATCH,
               **static) -> np.ndarray:
    """`fn(params, ids, mask, **static)`, jitted once per process, over fixed-shape batches
    of `size` sequences; the outputs (one row per sequence) concatenated as numpy.

    Example: `model_pass(layer_state, params, ids, mask, layer=3)` is the residual stream
    after layer 3 of every sequence, `model_pass(minilm.embed, params, ids, mask)` their
    sentence embeddings."""
    jitted = _jitted(fn, **static)
    parts = [np.asarray(jitted(params, *b.arrays))[:b.n_valid]
             for b in padded_batches(len(ids), size, ids, mask, attend=1)]
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------------
# Positions


def special_ids(tokenizer) -> set[int]:
    """The ids of `[CLS]`/`[SEP]`/`[PAD]` in a `tokenizers.Tokenizer` (none for None)."""
    if tokenizer is None or not hasattr(tokenizer, "token_to_id"):
        return set()
    s = Specials.of(tokenizer)
    return {i for i in (s.cls, s.sep, s.pad) if i is not None}


def steered_positions(ids: np.ndarray, mask: np.ndarray, specials: set[int],
                      keep_special: bool) -> np.ndarray:
    """Which tokens of tokenised texts the SAE stands in for (module docstring), from their
    ids: not the `specials` (`special_ids`) unless `keep_special`, never padding."""
    real = np.asarray(mask).astype(bool)
    if keep_special or not specials:
        return real
    return real & ~np.isin(ids, sorted(specials))


def spliced_positions(mask: np.ndarray, positions: np.ndarray, keep_special: bool) -> np.ndarray:
    """Which tokens of harvested sequences the SAE stands in for (module docstring), from
    their positions (`NO_POSITION` marks `[CLS]`/`[SEP]` and padding): what harvest stores
    and what fidelity splices."""
    real = np.asarray(mask).astype(bool)
    return real if keep_special else real & (np.asarray(positions) != NO_POSITION)
