"""Sharded sparse vs sharded dense TopK train steps, on 8 simulated CPU devices.

    from sae_jax.planning.bench_sharded import bench_sharded
    bench_sharded(d_in=384, width=24576, k=32, batch_size=4096)

A bench process sees one CPU device, and XLA fixes the device count when it starts, so the
measurement runs in a child Python with `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
The child times, in the same run, the sparse step (`saes.sparse`'s shard_maps) and the dense
reference (`sparse.disabled()`) on `data:1,model:8` and `data:2,model:4`, and prints one JSON
line. On a machine with fewer cores than devices the 8 simulated devices share the cores:
the figures show what the sharded paths compute and communicate, not how fast a pod runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from sae_jax.errors import UserError

DEVICES = 8
MESHES = ("data:1,model:8", "data:2,model:4")
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def bench_sharded(d_in: int = 384, width: int = 24576, k: int = 32, batch_size: int = 4096,
                  steps: int = 3, meshes: tuple[str, ...] = MESHES,
                  timeout: float = 1800) -> dict:
    """Tokens/s of the sparse and the dense TopK step on each of `meshes` (8 devices each),
    and their ratio.

    Returns:
      `{"sharded_devices": 8, "sharded": {mesh: {"sparse_tokens_per_s",
      "dense_tokens_per_s", "sparse_over_dense", "flops_per_token",
      "model_axis_bytes_per_token"}}, "sharded_sparse_over_dense_model8": ...}` (None
      without model:8 among `meshes`).
    """
    if width % DEVICES or batch_size % DEVICES or min(d_in, k, steps) < 1 or k > width:
        raise UserError(f"the sharded bench needs width and batch_size divisible by {DEVICES} "
                        f"and 1 <= k <= width, got width={width} batch_size={batch_size} "
                        f"k={k} (d_in={d_in}, steps={steps})")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if
             not f.startswith(DEVICE_FLAG)]
    env = {**os.environ, "XLA_FLAGS": " ".join([*flags, f"{DEVICE_FLAG}={DEVICES}"]),
           "JAX_PLATFORMS": "cpu"}
    sizes = {"d_in": d_in, "width": width, "k": k, "batch_size": batch_size, "steps": steps,
             "meshes": list(meshes)}
    try:
        proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(sizes)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"the sharded bench took over {timeout:.0f} s; use smaller sizes") \
            from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the sharded bench failed: {last}")
    return json.loads(proc.stdout.splitlines()[-1])


def tokens_per_s(cfg, d_in: int, steps: int) -> float:
    """Tokens/s of `steps` compiled train steps on random data, after one warm-up step."""
    import jax

    from sae_jax.planning.bench import step_on_random_data

    _, step, state, x = step_on_random_data(cfg, d_in)
    state, metrics = step(state, x)  # compiles
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, x)
    jax.block_until_ready(metrics)
    return cfg.batch_size * steps / (time.perf_counter() - start)


def measure(d_in: int, width: int, k: int, batch_size: int, steps: int,
            meshes: list[str]) -> dict:
    """The child's work (module docstring): needs `DEVICES` devices."""
    import jax

    from sae_jax.config import make_config
    from sae_jax.mesh import parse_mesh
    from sae_jax.planning.cost import step_flops_per_token
    from sae_jax.saes import sparse

    if jax.device_count() != DEVICES:
        raise UserError(f"the sharded bench needs {DEVICES} devices, got {jax.device_count()}")
    out = {}
    for spec in meshes:
        cfg = make_config(arch="topk", width=width, k=k, batch_size=batch_size, mesh=spec,
                          compute_dtype="float32")
        model = parse_mesh(spec, DEVICES)["model"]
        fast = tokens_per_s(cfg, d_in, steps)
        with sparse.disabled():
            slow = tokens_per_s(cfg, d_in, steps)
        out[spec] = {"sparse_tokens_per_s": fast, "dense_tokens_per_s": slow,
                     "sparse_over_dense": fast / slow,
                     "flops_per_token": step_flops_per_token("topk", d_in, width, k, True,
                                                             model=model),
                     "model_axis_bytes_per_token": sparse.model_axis_bytes(d_in, k, model)}
    model8 = out.get("data:1,model:8", {}).get("sparse_over_dense")
    return {"sharded_devices": DEVICES, "sharded": out, "sharded_sparse_over_dense_model8": model8}


def bench_section(cfg, settings: dict) -> dict:
    """`sae-jax bench`'s rows (an `EXTRA_SECTIONS` entry): sparse over dense TopK on both
    meshes, at the bench's size (TopK whatever the bench's arch; k 32 unless it is TopK)."""
    k = cfg.k if cfg.arch == "topk" and cfg.k else 32
    result = bench_sharded(d_in=settings["d_in"], width=cfg.width, k=min(k, cfg.width),
                           batch_size=cfg.batch_size, steps=1 + settings["bench_steps"])
    rows = [(f"sharded TopK {spec}: sparse / dense", f"{r['sparse_over_dense']:.2f}x",
             f"{r['sparse_tokens_per_s']:,.0f} vs {r['dense_tokens_per_s']:,.0f} tok/s on "
             f"{DEVICES} simulated devices (structure, not speed)")
            for spec, r in result["sharded"].items()]
    return {"rows": rows, **result}


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
