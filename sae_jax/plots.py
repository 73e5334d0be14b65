"""Matplotlib figures rendered to PNG bytes (eval, compare and scaling plots).

No pyplot: no global state and no GUI backend, so plotting works in threads, tests and on
headless TPU VMs.
"""

from __future__ import annotations

import io


def figure(width: float, height: float, n_axes: int = 1):
    """`(fig, axes)`: a figure of `width` × `height` inches with `n_axes` side by side."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, [fig.add_subplot(1, n_axes, i + 1) for i in range(n_axes)]


def png(fig) -> bytes:
    """The figure, laid out tightly, as PNG bytes."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
