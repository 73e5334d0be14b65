"""Does it fit? Per-device memory of the train step as the dictionary is split over chips.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/memory_scaling.py

Part 1 compiles the real train step for a 1M-feature SAE at d=384 (batch 4096, f32) on
8 simulated devices and reads XLA's memory analysis: nothing is allocated, so it runs on a
laptop. Part 2 is the same arithmetic for 34M features at d=4096 (Scaling
Monosemanticity's largest SAE) on v5p chips (95 GiB HBM each), using the auto-mesh rule.

Result (2026-11-23, jax 0.10.2, CPU): state per device 9.02 / 2.25 / 1.13 GiB on
model:1 / 4 / 8; peak 16.5 / 8.8 / 7.7 GiB (relu), 19.7 / 14.9 / 13.2 GiB (topk); 34M x 4096
needs model:128 on v5p (25.5 GiB of state per chip). docs/sharding-and-tpu.md "Memory at scale".
"""

import jax

from sae_jax.config import make_config
from sae_jax.mesh import STATE_BYTES_PER_WEIGHT, auto_mesh_spec, make_mesh
from sae_jax.planning.bench import step_memory

GIB = 2**30


def measured(d_in=384, width=2**20, batch=4096):
    print(f"1) compiled train step, d_in={d_in}, width={width:,}, batch={batch}, f32, "
          f"{jax.device_count()} devices")
    print("   mesh              state/device   temporaries/device   peak/device")
    for spec in ("data:8,model:1", "data:2,model:4", "data:1,model:8"):
        for arch in ("relu", "topk"):
            cfg = make_config(arch=arch, width=width, k=32, batch_size=batch, mesh=spec,
                              compute_dtype="float32")
            m = step_memory(cfg, d_in, make_mesh(spec))
            print(f"   {spec:<15} {arch:<5} {m['state_bytes_per_device'] / GIB:8.2f} GiB"
                  f"   {m['temp_bytes_per_device'] / GIB:12.2f} GiB"
                  f"   {m['peak_bytes_per_device'] / GIB:10.2f} GiB")


def v5p(d_in=4096, width=34 * 2**20, hbm=95 * GIB):
    state = STATE_BYTES_PER_WEIGHT * 2 * d_in * width
    print(f"2) {width / 2**20:.0f}M features at d_in={d_in}: "
          f"params + Adam = {state / GIB:,.0f} GiB")
    for chips in (64, 128, 256, 512):
        try:
            spec = auto_mesh_spec(chips, d_in, width, hbm)
        except Exception as e:  # noqa: BLE001 - report the rule's refusal
            print(f"   v5p, {chips} chips: does not fit ({str(e).split(';')[0]})")
            continue
        model = int(spec.split("model:")[1])
        print(f"   v5p, {chips} chips: mesh {spec}: {state / model / GIB:.1f} GiB of state per chip"
              f" ({state / model / hbm:.0%} of HBM)")


if __name__ == "__main__":
    measured()
    v5p()
