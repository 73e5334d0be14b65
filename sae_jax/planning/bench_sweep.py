"""What batching equal-shape sweep members buys: one vmapped step vs separate runs.

`bench_vmapped` trains `members` SAEs that differ only in seed (a seed sweep, the standard
way to get confidence intervals) for the same steps three ways, in one process: as separate
runs (each its own compiled step), as today's one-pass sweep (each member's own step fused
in one program), and as one vmapped step over stacked states (`training.stacked`). It
reports the wall time of each, the ratios, and how far the batched params are from the
separate runs' (float32 rounding, not bitwise: see `training.stacked`).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from sae_jax.config import make_config
from sae_jax.mesh import batch_sharding, make_mesh, replicated
from sae_jax.training import stacked
from sae_jax.training.step import init_state, make_optimizer, make_train_step, state_shardings


def _time_steps(step, state, x, steps: int) -> tuple[object, float, float]:
    """`(final state, compile + first step seconds, seconds per later step)`."""
    start = time.perf_counter()
    state, metrics = step(state, x)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps - 1):
        state, metrics = step(state, x)
    jax.block_until_ready((state, metrics))
    return state, first, (time.perf_counter() - start) / max(1, steps - 1)


def bench_vmapped(d_in: int = 64, width: int = 1024, batch_size: int = 1024, steps: int = 20,
                  members: int = 4, arch: str = "topk", k: int = 16,
                  devices: list | None = None) -> dict:
    """Times `members` seed-sweep members (seed=0..members-1) batched vs separate.

    Returns:
      `{"members", "d_in", "width", "batch_size", "steps", "arch", "separate_step_ms",
      "fused_step_ms", "batched_step_ms", "speedup_vs_separate", "speedup_vs_fused",
      "compile_s": {...}, "max_rel_diff", "bitwise"}`: step times are per step of all
      members together (compilation excluded, reported apart); `speedup_vs_separate` is
      separate / batched wall time; `max_rel_diff` the largest |batched - separate| over
      max |separate| of any final param.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    cfgs = [make_config(arch=arch, width=width, k=k, batch_size=batch_size, steps=steps,
                        seed=s, data_seed=0).for_devices(devices, d_in)
            for s in range(members)]
    mesh = make_mesh(cfgs[0].mesh, devices)
    tx = make_optimizer(cfgs[0])
    _, state_sh = state_shardings(cfgs[0], d_in, tx, mesh)
    x = jax.device_put(np.random.default_rng(0).standard_normal((batch_size, d_in),
                                                                np.float32),
                       batch_sharding(mesh))
    init = jax.jit(lambda key: init_state(key, cfgs[0], d_in, None, tx), out_shardings=state_sh)

    def fresh():
        return [init(jax.random.key(c.seed)) for c in cfgs]

    out_sh = (state_sh, replicated(mesh))
    one = jax.jit(make_train_step(cfgs[0], tx, mesh, 1.0),
                  in_shardings=(state_sh, batch_sharding(mesh)), out_shardings=out_sh,
                  donate_argnums=0)
    separate, separate_s, first_s = [], 0.0, 0.0
    for state in fresh():
        state, first, per_step = _time_steps(one, state, x, steps)
        separate.append(state)
        separate_s, first_s = separate_s + per_step, first_s + first

    step = make_train_step(cfgs[0], tx, mesh, 1.0)
    fused = jax.jit(lambda states, x: tuple(zip(*[step(s, x) for s in states])),
                    in_shardings=((state_sh,) * members, batch_sharding(mesh)),
                    out_shardings=((state_sh,) * members, (replicated(mesh),) * members),
                    donate_argnums=0)
    _, fused_first, fused_s = _time_steps(fused, tuple(fresh()), x, steps)

    stacked_sh = jax.tree.map(stacked.stacked_sharding, state_sh)
    batched = jax.jit(stacked.make_group_step(cfgs, mesh, 1.0),
                      in_shardings=(stacked_sh, batch_sharding(mesh)),
                      out_shardings=(stacked_sh, replicated(mesh)), donate_argnums=0)
    final, batched_first, batched_s = _time_steps(
        batched, stacked.stack_states(fresh(), stacked_sh), x, steps)

    diffs = [float(np.abs(np.asarray(b) - np.asarray(a)).max() / np.abs(np.asarray(a)).max())
             for state, b_state in zip(separate,
                                       stacked.unstack_states(final, (state_sh,) * members))
             for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(b_state.params))]
    return {"members": members, "d_in": d_in, "width": width, "batch_size": batch_size,
            "steps": steps, "arch": arch, "separate_step_ms": separate_s * 1e3,
            "fused_step_ms": fused_s * 1e3, "batched_step_ms": batched_s * 1e3,
            "speedup_vs_separate": separate_s / batched_s,
            "speedup_vs_fused": fused_s / batched_s,
            "compile_s": {"separate": first_s, "fused": fused_first,
                          "batched": batched_first},
            "max_rel_diff": max(diffs), "bitwise": max(diffs) == 0.0}


SECTION_SIZE = {"width": 2048, "batch_size": 1024, "members": 4}
"""The bench's sweep figure: small members, where batching is meant to pay (a big member
already fills the machine on its own); a smaller bench config shrinks them to its size."""


def bench_section(cfg, settings: dict) -> dict:
    """`sae-jax bench`'s rows for 4 seed-sweep members at the bench's d_in and arch (an
    `EXTRA_SECTIONS` entry): batched vs separate runs, and whether they agree bitwise."""
    arch = cfg.arch if cfg.arch in ("topk", "relu", "batchtopk", "jumprelu") else "topk"
    size = {**SECTION_SIZE, "width": min(SECTION_SIZE["width"], cfg.width),
            "batch_size": min(SECTION_SIZE["batch_size"], cfg.batch_size)}
    result = bench_vmapped(d_in=settings["d_in"], arch=arch, k=min(cfg.k or 16, 64, cfg.width),
                           steps=2 * settings["bench_steps"], **size)
    size = (f"{result['members']} x {arch} d {result['d_in']}, width {result['width']}, "
            f"batch {result['batch_size']}")
    rows = [("sweep: batched / separate runs", f"{result['speedup_vs_separate']:.2f}x",
             f"{size}; --batch-members vs {result['members']} runs"),
            ("sweep: batched / fused sweep", f"{result['speedup_vs_fused']:.2f}x",
             "the default sweep step (one program, members side by side)"),
            ("sweep: batched max rel. diff", f"{result['max_rel_diff']:.1e}",
             "bitwise" if result["bitwise"] else "not bitwise on this backend")]
    return {"rows": rows, "sweep_batched": result}


__all__ = ["bench_section", "bench_vmapped"]
