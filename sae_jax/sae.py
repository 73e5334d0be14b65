"""A trained SAE as users meet it: `sae_jax.load(RUN_DIR)`.

`SAE.encode` / `SAE.decode` take and return *raw* activations: the input scale learned at
training time is applied inside, so callers never see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import jax
import jax.numpy as jnp

from sae_jax import checkpoint, saes
from sae_jax.config import TrainConfig
from sae_jax.errors import UserError
from sae_jax.mesh import make_mesh
from sae_jax.run import read_run


@dataclass(frozen=True)
class SAE:
    """A trained SAE on one device.

    Attributes:
      config: the run's `TrainConfig`.
      params: `W_enc (d_in, F)`, `b_enc (F,)`, `W_dec (F, d_in)`, `b_dec (d_in,)` and any
        architecture extras, in scaled-input units.
      input_scale: raw activations are multiplied by this before encoding.
      step: the training step the params come from.
    """

    config: TrainConfig
    params: dict
    input_scale: float
    step: int

    @property
    def d_in(self) -> int:
        return int(self.params["W_dec"].shape[1])

    @property
    def width(self) -> int:
        return int(self.params["W_dec"].shape[0])

    @cached_property
    def _encode(self):
        cfg = self.config
        return jax.jit(lambda p, x: saes.encode(p, x * self.input_scale, cfg).f)

    @cached_property
    def _decode(self):
        return jax.jit(lambda p, f: saes.decode(p, f) / self.input_scale)

    def _check(self, a, width: int, what: str):
        a = jnp.asarray(a, jnp.float32)
        if a.ndim == 0 or a.shape[-1] != width:
            raise UserError(f"{what} must have last dimension {width}, got shape {a.shape}")
        return a

    def encode(self, x) -> jax.Array:
        """Raw activations (..., d_in) -> feature activations (..., F)."""
        x = self._check(x, self.d_in, "encode input")
        return self._encode(self.params, x.reshape(-1, self.d_in)).reshape(
            *x.shape[:-1], self.width)

    def decode(self, f) -> jax.Array:
        """Feature activations (..., F) -> reconstructed raw activations (..., d_in)."""
        f = self._check(f, self.width, "decode input")
        return self._decode(self.params, f.reshape(-1, self.width)).reshape(
            *f.shape[:-1], self.d_in)

    def __call__(self, x) -> jax.Array:
        """Reconstruction of raw activations."""
        return self.decode(self.encode(x))


def load(run_dir: str | Path, step: int | None = None) -> SAE:
    """Loads the latest (or `step`'s) checkpoint of a run onto the default device."""
    from sae_jax.train import make_optimizer, state_shardings

    run = read_run(run_dir)
    mngr = checkpoint.manager(run_dir)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise UserError(f"run {run_dir} has no checkpoint yet")
        if step is not None and step not in steps:
            raise UserError(f"run {run_dir} has no checkpoint at step {step} (has {steps})")
        mesh = make_mesh("", devices=jax.devices()[:1])
        shapes, shardings = state_shardings(run.config, run.d_in, make_optimizer(run.config),
                                            mesh)
        state = checkpoint.restore(
            mngr, checkpoint.abstract_with_shardings(shapes, shardings), step)
    finally:
        mngr.close()
    return SAE(run.config, state.params, run.input_scale, int(state.step))
