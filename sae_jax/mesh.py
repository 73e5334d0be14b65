"""The device mesh and the one table that maps logical axes to mesh axes.

Model code names its axes logically (`("embed", "latent")`); only `RULES` says that the
dictionary ("latent") is split over the "model" mesh axis and the batch over "data".
Changing the sharding strategy (e.g. FSDP: `"embed": "data"`) is a change to this table.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax.errors import UserError

AXES = ("data", "model")
RULES: dict[str, str | None] = {"batch": "data", "latent": "model", "embed": None}


def parse_mesh(spec: str, n_devices: int | None) -> dict[str, int]:
    """Parses `data:2,model:4` into axis sizes.

    An axis left out gets the remaining devices (data first), so `model:4` on 8 devices is
    `data:2,model:4`, and the empty string puts every device on `data`.

    Args:
      spec: comma-separated `axis:size` pairs over the axes `data` and `model`.
      n_devices: devices to cover, or None to check the syntax only.

    Returns:
      `{"data": n, "model": m}`.
    """
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition(":")
        if not sep or name not in AXES or not size.isdigit() or int(size) < 1:
            raise UserError(f"bad mesh {spec!r}: expected e.g. data:2,model:4 (axes: data, model)")
        if name in sizes:
            raise UserError(f"bad mesh {spec!r}: axis {name} given twice")
        sizes[name] = int(size)
    if n_devices is None:
        return sizes
    given = math.prod(sizes.values())
    missing = [a for a in AXES if a not in sizes]
    if missing and n_devices % given == 0:
        sizes[missing[0]] = n_devices // given
    for axis in AXES:
        sizes.setdefault(axis, 1)
    if sizes["data"] * sizes["model"] != n_devices:
        raise UserError(
            f"mesh {spec or '(default)'} needs {sizes['data'] * sizes['model']} devices, "
            f"but {n_devices} are available")
    return {a: sizes[a] for a in AXES}


STATE_BYTES_PER_WEIGHT = 12  # float32 param + Adam mu + nu
STATE_MEMORY_FRACTION = 0.3  # leave the rest for activations, gradients and compilation


def auto_mesh_spec(n_devices: int, d_in: int, width: int,
                   device_bytes: int | None) -> str:
    """The default mesh: pure data parallelism unless the SAE state does not fit.

    As Gemma Scope did, the dictionary is split over a "model" axis only when params + Adam
    state (12 bytes per weight, 2·d_in·F weights) would take more than 30% of one device's
    memory; then the smallest power-of-two model axis that fits is used.

    Args:
      device_bytes: memory of one device, or None when unknown (CPU): data parallel.
    """
    state = STATE_BYTES_PER_WEIGHT * 2 * d_in * width
    model = 1
    while device_bytes and state / model > STATE_MEMORY_FRACTION * device_bytes:
        if model * 2 > n_devices or n_devices % (model * 2) or width % (model * 2):
            raise UserError(
                f"an SAE of width {width} on d_in={d_in} needs {state / model / 2**30:.1f} GiB "
                f"of params and Adam state per device even split {model} ways; use more "
                "devices or a smaller width")
        model *= 2
    return f"data:{n_devices // model},model:{model}"


def device_memory_bytes(device) -> int | None:
    """Bytes of memory of an accelerator, None where the runtime does not say (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def make_mesh(spec: str = "", devices: list | None = None) -> Mesh:
    """Builds the ("data", "model") mesh described by `spec` over `devices` (default: all)."""
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def logical_to_spec(axes: tuple[str | None, ...], rules=None) -> P:
    """`("embed", "latent")` -> `P(None, "model")` under `rules` (default `RULES`)."""
    rules = RULES if rules is None else rules
    return P(*(rules.get(a) if a is not None else None for a in axes))


def logical_to_sharding(axes_tree, mesh: Mesh, rules=None):
    """Maps a pytree of logical-axis tuples to a pytree of `NamedSharding`s on `mesh`."""
    return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)),
                        axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a `(batch, d_in)` activation batch: rows over `data`."""
    return NamedSharding(mesh, logical_to_spec(("batch", "embed")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
