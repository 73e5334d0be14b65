"""`sae-jax bench`: measured throughput, printed as ratios taken in one run.

Measures, for one SAE size: the store's read bandwidth, the Grain loader's rows/s, and
the train step's tokens/s (after compilation), and reports whether the loader keeps up
(`loader_over_step` must be ≥ 10: the loader is never the bottleneck). The last stdout
line is one JSON object.
"""

from __future__ import annotations

import tempfile
import time

import jax
import numpy as np

BENCH_KEYS = {"d_in": 384, "bench_steps": 5, "store_rows": 262_144}
TRAIN_DEFAULTS = ["arch=topk", "k=32", "width=24576", "batch_size=4096"]


def _timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench_store(d_in: int, n_rows: int, batch_size: int, n_batches: int, seed: int) -> dict:
    """Writes a random store, then times a full read and the loader over it."""
    from sae_jax.loader import BatchSource, batches
    from sae_jax.store import CHUNK_ROWS, StoreWriter, open_store

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


def bench_train_step(cfg, d_in: int, n_steps: int) -> dict:
    """Compiles the train step on random data and times `n_steps` steps."""
    from sae_jax.mesh import batch_sharding, make_mesh
    from sae_jax.train import compile_train_step, init_state, make_optimizer, state_shardings

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
    memory = compiled.memory_analysis()
    state, metrics = compiled(state, x)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(n_steps):
        state, metrics = compiled(state, x)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / n_steps
    peak = None
    if memory is not None:
        peak = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                   + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    return {"step_ms": step_s * 1e3, "tokens_per_s": cfg.batch_size / step_s,
            "compile_s": compile_s, "peak_bytes_per_device": peak}


def run_bench(pairs: list[str]) -> dict:
    from sae_jax.config import make_config
    from sae_jax.errors import UserError

    extra = dict(BENCH_KEYS)
    rest = []
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key in extra:
            try:
                extra[key] = int(float(value))
            except ValueError:
                raise UserError(f"bad value for {key}: {value!r} (expected int)") from None
        else:
            rest.append(pair)
    cfg = make_config(TRAIN_DEFAULTS + rest).for_devices(jax.devices(), extra["d_in"])
    step = bench_train_step(cfg, extra["d_in"], extra["bench_steps"])
    data = bench_store(extra["d_in"], extra["store_rows"], cfg.batch_size,
                       n_batches=max(8, extra["store_rows"] // cfg.batch_size), seed=cfg.seed)
    result = {
        "arch": cfg.arch, "d_in": extra["d_in"], "width": cfg.width, "k": cfg.k,
        "batch_size": cfg.batch_size, "compute_dtype": cfg.compute_dtype,
        "devices": jax.device_count(), "backend": jax.default_backend(), **step, **data,
        "loader_over_step": data["loader_rows_per_s"] / step["tokens_per_s"],
    }
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    rows = [("train step", f"{result['step_ms']:.1f} ms", f"{result['tokens_per_s']:,.0f} tok/s"),
            ("compile", f"{result['compile_s']:.1f} s", ""),
            ("store read", f"{result['store_read_gib_per_s']:.2f} GiB/s", ""),
            ("loader", f"{result['loader_rows_per_s']:,.0f} rows/s",
             f"{result['loader_over_step']:.1f}x the step's consumption")]
    width = max(len(r[0]) for r in rows)
    head = (f"sae-jax bench: arch={result['arch']} d_in={result['d_in']} width={result['width']}"
            f" k={result['k']} batch={result['batch_size']} {result['compute_dtype']} on "
            f"{result['devices']} {result['backend']} device(s)")
    return "\n".join([head] + [f"  {a:<{width}}  {b:>16}  {c}" for a, b, c in rows])

