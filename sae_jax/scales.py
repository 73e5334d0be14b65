"""A run's input (and a transcoder's target) scale: what raw activations are multiplied by.

A single-source store gets one float c with E‖c·x‖² = d, as always. A multi-source store
(`meta["sources"]`: e.g. two models side by side, or several layers) gets one scale per
source, c_s with E‖c_s·x_s‖² = d_s, so a source with larger norms no longer dominates the
loss (nor, for a crosscoder, the relative decoder norms). It is kept as a tuple of d floats,
constant over each source's columns: a tuple is hashable (an `SAE` is a jit-static pytree
node), is saved as a JSON list in the run's `config.json`, and `multiplier` turns it into a
(d,) array that broadcasts over a row's columns, so `x * c` and a raw-unit decoder row
`W_dec[i] / c` mean the same thing for both kinds.
"""

from __future__ import annotations

import numpy as np

Scale = float | tuple[float, ...]


def is_per_source(scale: Scale) -> bool:
    return isinstance(scale, tuple)


def multiplier(scale: Scale):
    """What raw activations are multiplied by: the float itself (so single-source runs stay
    bit for bit what they were), or a float32 (d,) array."""
    return np.asarray(scale, np.float32) if is_per_source(scale) else scale


def per_source(sample: np.ndarray, widths: list[int] | None) -> Scale:
    """The scale of `sample (n, d)`: one float, or with several source `widths` one per
    source, repeated over its columns."""
    from sae_jax.data.loader import scale_and_mean

    if widths is None or len(widths) < 2:
        return scale_and_mean(sample)[0]
    bounds = np.cumsum([0, *widths])
    each = [float(scale_and_mean(sample[:, a:b])[0]) for a, b in zip(bounds, bounds[1:])]
    return tuple(c for c, width in zip(each, widths) for _ in range(width))


def split_widths(widths: list[int] | None, d_in: int,
                 d_out: int | None) -> tuple[list[int] | None, list[int] | None]:
    """A store's source widths split at the input/target boundary (a transcoder store's
    sources, e.g. a cross-layer transcoder's `mlp_in.*` then `mlp_out.*`); None for a side
    without several sources, or when no source boundary falls at `d_in`."""
    if not widths:
        return None, None
    if d_out is None:
        return widths, None
    ends = list(np.cumsum(widths))
    if d_in not in ends:
        return None, None
    cut = ends.index(d_in) + 1
    return widths[:cut], widths[cut:]


def to_json(scale: Scale | None):
    """A float, a list of per-column floats, or None."""
    if is_per_source(scale):
        return list(scale)
    return None if scale is None else float(scale)


def from_json(value, what: str, width: int) -> Scale:
    """A saved scale: a number (every run until now) or a list of `width` per-column
    numbers; ValueError for anything else."""
    if isinstance(value, list):
        if len(value) != width:
            raise ValueError(f"{what} lists {len(value)} values for {width} columns")
        return tuple(float(v) for v in value)
    return float(value)
