"""Harvest: run a model over a corpus and write one activation row per real token to a store.

`harvest` is generic: it takes ANY `activations_fn(input_ids, attention_mask) -> (n, L, d)`,
jits it once for a fixed `(batch_size, seq_len)` shape, shards each batch of sequences over
the data axis of a `("data", "model")` mesh, and appends the rows of real tokens (`[CLS]`,
`[SEP]`, BOS left out unless `keep_special`; padding never) with their token ids and
`(document, position)` to a `StoreWriter`, stopping at exactly `max_tokens` rows. The next
batch is dispatched before the previous one is copied back and written, so host work
(tokenising, writing) overlaps the model. A `KeyboardInterrupt` or error anywhere removes the
partial store (the `StoreWriter` context), so a rerun starts cleanly.

`run_harvest` is the `sae-jax harvest` command: all-MiniLM-L6-v2 at one layer, or a causal
LM from a local Hugging Face folder at one site of one block (its weights split over the
mesh's "model" axis and kept there), over the default corpus (the stdlib's sources, see
`sae_jax.lm.corpus`) or your files. What each model contributes (its activation function,
framing tokens and store metadata) is in `sae_jax.lm.harvest_models`.

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
from sae_jax.lm.families import SUPPORTED
from sae_jax.lm.harvest_models import MODEL_DTYPES, PAIR_HOOKS
from sae_jax.lm.hooks import spliced_positions
from sae_jax.lm.transformer import SITES
from sae_jax.mesh import batch_sharding, make_mesh, replicated

DEFAULT_LAYER = 3
DEFAULT_MAX_TOKENS = 1_000_000
DEFAULT_SEQ_LEN = 128
# Sequences per batch. On the 2-core CPU box, layer 3 at seq_len 128 runs ~6.5-6.8k token
# slots/s for batches of 4-16 sequences and slower for 24+ (out of cache); 8 was best per
# CPU-second. On an accelerator pass a larger --batch-size.
DEFAULT_BATCH_SIZE = 8

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


def _call(fn, ids, mask):
    return fn(ids, mask)


def _placed(leaf, mesh) -> NamedSharding:
    """Where a weight goes: where it already is when that is on `mesh` (a causal LM's params
    split over "model" stay split), otherwise replicated (e.g. numpy weights)."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
        return sharding
    return replicated(mesh)


def _jit(activations_fn: ActivationsFn, mesh) -> Callable:
    """`activations_fn` jitted with the batch sharded over `data`; a `Partial` is passed as an
    argument so its arrays (the weights) are jit inputs, not constants, each keeping its own
    sharding. One module-level `_call` is jitted, so a second harvest with the same function
    and shapes reuses the compiled program."""
    data = batch_sharding(mesh)
    out = NamedSharding(mesh, P("data"))
    if isinstance(activations_fn, Partial):
        weights = jax.tree.map(lambda leaf: _placed(leaf, mesh), activations_fn)
        fn = jax.jit(_call, in_shardings=(weights, data, data), out_shardings=out)
        # Put the weights on the devices once, not on every call.
        return functools.partial(fn, jax.device_put(activations_fn, weights))
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
      keep_special: also write `[CLS]`/`[SEP]`/BOS rows (position -1); padding never.
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


# ---------------------------------------------------------------------------- the command


def _check_options(models: list[str], site: str | None, pair: str | None,
                   model_dtype: str | None, max_tokens: int, batch_size: int, dtype: str,
                   names: list[str] | None = None, layers: list[int] | None = None) -> None:
    """The checks that need no weights: ranges, choices and which options go together."""
    from sae_jax.data.store import STORE_DTYPES
    from sae_jax.lm.transformer import SITES

    if max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if dtype not in STORE_DTYPES:
        raise UserError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype}")
    if pair is not None and pair not in PAIR_HOOKS:
        raise UserError(f"pair must be one of {', '.join(PAIR_HOOKS)}, got {pair!r}")
    if site is not None and site not in SITES:
        raise UserError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    if pair is not None and site is not None:
        raise UserError("--pair and --site exclude each other: a pair stores its own two "
                        "sites (mlp: MLP input -> mlp_out; block: stream before -> resid)")
    if model_dtype is not None and model_dtype not in MODEL_DTYPES:
        raise UserError(f"model_dtype must be one of {', '.join(MODEL_DTYPES)}, "
                        f"got {model_dtype!r}")
    if "minilm" in models and site is not None:
        raise UserError("--site is for causal LMs; minilm stores the residual stream after "
                        "--layer (use --pair mlp|block for its MLP or block pairs)")
    if model_dtype is not None and all(m == "minilm" for m in models):
        raise UserError("--model-dtype is for causal LMs; minilm always runs in float32")
    if len(models) > 1 and (pair is not None or layers is not None):
        raise UserError("several --model run at one --layer and site; --pair and --layers "
                        "take one model")
    if names is not None and len(models) == 1:
        raise UserError("--names names the sources of several --model (--layers names its "
                        "sources layer<L>, or mlp_in.<L> / mlp_out.<L>)")


def _plan(models: list[str], names, layer: int, layers, site, pair, seq_len: int,
          keep_special: bool, max_tokens: int):
    """`(meta, width, load)`: the store's meta and row width from the models' configs, and
    `load(mesh, model_dtype) -> (Source, sources meta or None)`."""
    from sae_jax.lm import harvest_sources as multi

    if len(models) > 1:
        return multi.models_plan(models, names, layer, site, seq_len, keep_special, max_tokens)
    if layers is not None:
        return multi.layers_plan(models[0], list(layers), site, pair, seq_len, keep_special,
                                 max_tokens)
    meta, width = multi.model_plan(models[0], layer, site, pair, seq_len, keep_special,
                                   max_tokens)
    return meta, width, lambda mesh, model_dtype: (
        multi.model_source(models[0], layer, site, pair, model_dtype, mesh), None)


def run_harvest(data_dir: str | os.PathLike, model: str | list = "minilm",
                layer: int = DEFAULT_LAYER, max_tokens: int = DEFAULT_MAX_TOKENS,
                seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = DEFAULT_BATCH_SIZE,
                corpus: None | str | os.PathLike | list = None, dtype: str = "float32",
                keep_special: bool = False, progress: bool = True, mesh=None,
                pair: str | None = None, *, site: str | None = None,
                model_dtype: str | None = None, names: list[str] | None = None,
                layers: list[int] | None = None) -> dict:
    """`sae-jax harvest`: a model's activations at one hook over a corpus into a new store;
    or several models' at one hook, or one model's at several layers, side by side
    (`sae_jax.lm.harvest_sources`).

    Args:
      data_dir: the new store (must not exist, or be empty).
      model: "minilm" (all-MiniLM-L6-v2), a local Hugging Face folder of a causal LM
        (`sae_jax.lm.families.SUPPORTED`) or of a BERT with MiniLM's architecture (e.g. a
        fine-tuned MiniLM); or a list of these, run on the same tokens (one shared
        vocabulary), each row their activations side by side (`meta["sources"]`).
      layer: minilm: residual stream after this layer, 0 (embeddings) .. 6. A causal LM: the
        0-based block, 0 .. n_layers - 1.
      max_tokens: rows to write (fewer only if the corpus runs out; `corpus_exhausted` says so).
      seq_len: tokens per sequence including `[CLS]`/`[SEP]` (minilm, 3..512) or BOS.
      batch_size: sequences per model call.
      corpus: None for the Python stdlib's sources, or text / `.jsonl` paths (`sae_jax.lm.corpus`).
      dtype: "float32" or "bfloat16" on disk.
      keep_special: also store `[CLS]`/`[SEP]` (minilm) or BOS rows.
      progress: show the progress bar.
      mesh: a `("data", "model")` mesh or its spec ("data:2,model:4"); default every device
        on `data`. A causal LM's weights are split over "model", batches over "data".
      pair: transcoder pairs instead of one activation: "mlp" (block `layer`'s MLP input ->
        its output) or "block" (residual stream before block `layer` -> after it; minilm:
        after `layer - 1` -> after `layer`); each row is the input followed by the target
        (`meta["pair"]` gives both widths). With `layers`: "mlp" only, the cross-layer
        transcoder store.
      site: a causal LM's hook site in block `layer`: "resid" (default), "attn_out" or
        "mlp_out" (what that sub-layer adds to the stream).
      model_dtype: a causal LM's weights and compute, "float32" or "bfloat16" (default:
        float32 on CPU, bfloat16 on accelerators).
      names: the sources' names for several models (default: the folder names, or a, b …).
      layers: several layers of one model instead of `layer`, from one forward pass.

    Returns:
      The store's `meta.json` contents plus `data_dir`.
    """
    from sae_jax.data.store import StoreWriter, open_store

    data_dir = str(data_dir)
    models = [str(model)] if isinstance(model, (str, os.PathLike)) else list(map(str, model))
    _check_options(models, site, pair, model_dtype, max_tokens, batch_size, dtype, names,
                   layers)
    if isinstance(mesh, str):
        mesh = make_mesh(mesh)
    meta, width, load = _plan(models, names, layer, layers, site, pair, seq_len, keep_special,
                              max_tokens)
    if any(m != "minilm" for m in models):
        mesh = make_mesh() if mesh is None else mesh  # the model's and the batches' mesh
    # The writer checks the target first, so a bad DATA_DIR fails before any model work;
    # any error below (an empty corpus, Ctrl-C) removes what was written.
    with StoreWriter(data_dir, d_in=width, dtype=dtype, meta=meta,
                     with_tokens=True) as writer:
        docs = make_corpus(corpus)
        source, sources = load(mesh, model_dtype)
        seqs = sequences(docs, source.tokenizer, seq_len, specials=source.specials)
        first = next(seqs, None)
        if first is None:
            raise UserError(f"the corpus holds no text to harvest ({docs.description})")
        writer.meta.update(corpus=docs.description, **source.meta)
        if sources is not None:
            writer.meta["sources"] = sources
        stats = harvest(source.activations, itertools.chain([first], seqs), writer,
                        max_tokens=max_tokens, batch_size=batch_size,
                        keep_special=keep_special, progress=progress, mesh=mesh)
        writer.meta.update(stats)
    if stats["corpus_exhausted"]:
        print(f"sae-jax: warning: the corpus ran out after {stats['n_rows']} of {max_tokens} "
              "tokens", file=sys.stderr)
    return {"data_dir": data_dir, **open_store(data_dir).meta}


def add_arguments(parser) -> None:
    """Adds `sae-jax harvest DATA_DIR [options]` arguments to an argparse (sub)parser."""
    parser.add_argument("data_dir", help="new store directory")
    parser.add_argument("--model", action="append", default=None,
                        help="minilm (default: the packaged all-MiniLM-L6-v2), a local "
                             "Hugging Face folder of a causal LM (config.json, *.safetensors, "
                             f"tokenizer.json; model types: {', '.join(SUPPORTED)}) or of a "
                             "BERT with MiniLM's architecture; repeat it to run several "
                             "models (one vocabulary) on the same tokens, rows side by side")
    parser.add_argument("--names", type=lambda s: s.split(","), default=None,
                        help="with several --model: the sources' names, e.g. base,tuned "
                             "(default: the folder names, or a,b if equal)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--layer", type=int, default=DEFAULT_LAYER,
                       help="minilm: residual stream after this layer, 0 (embeddings) .. 6; "
                            "a causal LM: the 0-based block, 0 .. n_layers-1 "
                            f"(default: {DEFAULT_LAYER})")
    where.add_argument("--layers", type=_layer_list, default=None, metavar="L1,L2,...",
                       help="several layers of one model from one pass, one source each "
                            "(layer<L>); with --pair mlp a cross-layer transcoder store")
    parser.add_argument("--site", choices=SITES,
                        help="causal LMs: resid = the residual stream after block LAYER "
                             "(default), attn_out / mlp_out = what its attention / MLP adds")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"rows (tokens) to write (default: {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                        help="tokens per sequence incl. [CLS]/[SEP] or BOS "
                             f"(default: {DEFAULT_SEQ_LEN})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"sequences per model call (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--mesh", default=None, metavar="SPEC",
                        help="device mesh, e.g. data:2,model:4: batches split over data, a "
                             "causal LM's heads and MLP over model (default: all on data)")
    parser.add_argument("--model-dtype", choices=MODEL_DTYPES, default=None,
                        help="causal LMs: weights and compute dtype (default: float32 on "
                             "CPU, bfloat16 on accelerators)")
    parser.add_argument("--corpus", nargs="+", action="extend", metavar="PATH", default=None,
                        help="text files/directories (one document per blank-line paragraph) "
                             'or .jsonl files ({"text": ...} per line); may be repeated; '
                             "default: the Python standard library's sources")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="on-disk dtype (default: float32)")
    parser.add_argument("--keep-special", action="store_true",
                        help="also store [CLS]/[SEP] (minilm) or BOS (causal LMs) rows")
    parser.add_argument("--pair", choices=tuple(PAIR_HOOKS),
                        help="store transcoder pairs: mlp = block LAYER's MLP input -> output; "
                             "block = residual stream before block LAYER -> after it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _layer_list(text: str) -> list[int]:
    import argparse

    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got "
                                         f"{text!r}") from None


def harvest_kwargs(args) -> dict:
    """`run_harvest` keyword arguments from a namespace parsed with `add_arguments`."""
    models = args.model or ["minilm"]
    return {"data_dir": args.data_dir, "model": models[0] if len(models) == 1 else models,
            "names": args.names, "layers": args.layers, "layer": args.layer,
            "max_tokens": args.max_tokens, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "corpus": args.corpus, "dtype": args.dtype,
            "keep_special": args.keep_special, "progress": not args.quiet,
            "pair": args.pair, "site": args.site, "mesh": args.mesh,
            "model_dtype": args.model_dtype}


def run(args) -> dict:
    return run_harvest(**harvest_kwargs(args))
