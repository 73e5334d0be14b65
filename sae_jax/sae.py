"""A trained SAE as users meet it: `sae_jax.load(RUN_DIR)`.

`SAE.encode` / `SAE.decode` take and return *raw* activations: the input scale learned at
training time (one float, or per source on a multi-source store: `sae_jax.scales`) is
applied inside, so callers never see it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from sae_jax import saes, scales
from sae_jax.config import TrainConfig
from sae_jax.errors import UserError
from sae_jax.mesh import logical_to_sharding, make_mesh
from sae_jax.rundir import read_run
from sae_jax.training import checkpoint


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("params", "step"),
                   meta_fields=("config", "input_scale", "target_scale"))
@dataclass(frozen=True, eq=False)
class SAE:
    """A trained SAE on one device.

    A pytree whose leaves are the params (and step) while config and scales are static, so
    an `SAE` can be passed into `jax.jit` as an argument: the params become inputs of the
    program, not baked constants, and SAEs of one config and scale share the compiled
    program. Compared by identity.

    Attributes:
      config: the run's `TrainConfig`.
      params: `W_enc (d_in, F)`, `b_enc (F,)`, `W_dec (F, d_in)`, `b_dec (d_in,)` and any
        architecture extras, in scaled-input units.
      input_scale: raw activations are multiplied by this before encoding: a float, or a
        tuple of per-column floats (one value per source; `sae_jax.scales`).
      step: the training step the params come from.
      target_scale: a transcoder's target scale (its outputs are divided by it); None for an
        SAE, whose outputs are divided by `input_scale`.
    """

    config: TrainConfig
    params: dict
    input_scale: scales.Scale
    step: int
    target_scale: scales.Scale | None = None

    @property
    def d_in(self) -> int:
        return int(self.params["W_enc"].shape[0])

    @property
    def d_out(self) -> int:
        """Width of what the SAE reconstructs (`d_in`, except for a transcoder)."""
        return int(self.params["W_dec"].shape[1])

    @property
    def transcoder(self) -> bool:
        return bool(self.config.transcoder)

    @property
    def input_multiplier(self):
        """What raw inputs are multiplied by: the float, or a (d_in,) float32 array."""
        return scales.multiplier(self.input_scale)

    @property
    def output_scale(self):
        """What outputs are divided by to be raw: a float, or a (d_out,) float32 array (so
        `W_dec / output_scale` is the decoder in raw units either way)."""
        return scales.multiplier(self.input_scale if self.target_scale is None else
                                 self.target_scale)

    @property
    def row_width(self) -> int:
        """Columns of a store row it reads: the input, plus the target for a transcoder."""
        return self.d_in + (self.d_out if self.transcoder else 0)

    def split_rows(self, rows):
        """A store's rows -> `(input, target)` raw arrays; the target is the input for an SAE."""
        return (rows[..., :self.d_in], rows[..., self.d_in:]) if self.transcoder else (rows, rows)

    @property
    def width(self) -> int:
        return int(self.params["W_dec"].shape[0])

    def encode_raw(self, x) -> jax.Array:
        """Feature activations `(n, F)` float32 of raw activations `x (n, d_in)`: the one place
        the input scale is applied before encoding. Traceable: inside your own `jax.jit`,
        take the SAE as an argument (see the class docstring)."""
        x = jnp.asarray(x, jnp.float32) * self.input_multiplier
        return saes.encode(self.params, x, self.config).f.astype(jnp.float32)

    def reconstruct_raw(self, x, f=None) -> jax.Array:
        """x̂ `(n, d_out)` in raw units (a transcoder's predicted target) of raw `x (n, d_in)`,
        traceable like `encode_raw`; `f` = `encode_raw(x)` if already computed."""
        scaled = jnp.asarray(x, jnp.float32) * self.input_multiplier
        f = saes.encode(self.params, scaled, self.config).f if f is None else f
        x_hat = (saes.decode(self.params, f, self.config.compute_dtype)
                 + saes.skip(self.params, scaled, self.config))
        return x_hat / self.output_scale

    def _check(self, a, width: int, what: str):
        a = jnp.asarray(a, jnp.float32)
        if a.ndim == 0 or a.shape[-1] != width:
            raise UserError(f"{what} must have last dimension {width}, got shape {a.shape}")
        return a

    def encode(self, x, columns=None) -> jax.Array:
        """Raw activations (..., d_in) -> feature activations (..., F), or (..., len(columns))
        of the features `columns` only (selected on the device)."""
        x = self._check(x, self.d_in, "encode input")
        flat = x.reshape(-1, self.d_in)
        f = (_encode(self, flat) if columns is None else
             _encode_columns(self, flat, jnp.asarray(columns, jnp.int32)))
        return f.reshape(*x.shape[:-1], f.shape[-1])

    def decode(self, f) -> jax.Array:
        """Feature activations (..., F) -> reconstructed raw activations (..., d_out).

        (A skip transcoder's linear path needs the input: use `sae(x)` for its output.)"""
        f = self._check(f, self.width, "decode input")
        return _decode(self, f.reshape(-1, self.width)).reshape(*f.shape[:-1], self.d_out)

    def __call__(self, x) -> jax.Array:
        """Reconstruction of raw activations (a transcoder's predicted target)."""
        x = self._check(x, self.d_in, "input")
        return _reconstruct(self, x.reshape(-1, self.d_in)).reshape(*x.shape[:-1], self.d_out)


_encode = jax.jit(lambda sae, x: sae.encode_raw(x))
_encode_columns = jax.jit(lambda sae, x, cols: sae.encode_raw(x)[:, cols])
_decode = jax.jit(lambda sae, f: saes.decode(sae.params, f) / sae.output_scale)
_reconstruct = jax.jit(lambda sae, x: sae.reconstruct_raw(x))


def param_shapes(cfg: TrainConfig, d_in: int, d_out: int | None = None) -> dict:
    """The params' shapes and dtypes (`jax.ShapeDtypeStruct`s) for a config, computed
    without allocating them."""
    return jax.eval_shape(lambda key: saes.init(key, cfg, d_in, None, d_out),
                          jax.random.key(0))


def load(run_dir: str | Path, step: int | None = None) -> SAE:
    """Loads the latest intact (or `step`'s) checkpoint of a run onto the default device, or
    a folder written by `sae-jax export` in sae_jax's own layout (`load_export`).

    Only the checkpoint's params are read: no optimizer or train state is built."""
    from sae_jax.saelens.native import is_native_dir

    if is_native_dir(run_dir):
        sae = load_export(run_dir)
        if step is not None and step != sae.step:
            raise UserError(f"{run_dir} is an export of step {sae.step} only, not {step}")
        return sae
    run = read_run(run_dir)
    mngr = checkpoint.manager(run_dir)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise UserError(f"run {run_dir} has no checkpoint yet")
        if step is not None and step not in steps:
            raise UserError(f"run {run_dir} has no checkpoint at step {step} (has {steps})")
        mesh = make_mesh("", devices=jax.devices()[:1])
        shardings = logical_to_sharding(saes.param_axes(run.config), mesh)
        abstract = checkpoint.abstract_with_shardings(
            param_shapes(run.config, run.d_in, run.d_out), shardings)
        params, step = checkpoint.read_params(mngr, abstract, step)
    finally:
        mngr.close()
    return SAE(run.config, params, run.input_scale, step, run.target_scale)


def load_export(path: str | Path) -> SAE:
    """An export in sae_jax's own layout (`sae_jax.saelens.native`) as an `SAE` whose encode
    and decode are the exported run's (the same params and scales, bit for bit).

    Raises:
      UserError: a damaged folder, or params whose names, shapes or dtypes are not those of
        the architecture in its cfg.json.
    """
    from sae_jax.saelens.native import read_native

    exp = read_native(path)
    want = {k: (tuple(v.shape), v.dtype) for k, v in
            param_shapes(exp["config"], exp["d_in"], exp["d_out"]).items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in exp["params"].items()}
    if got != want:
        wrong = sorted(k for k in set(want) | set(got) if got.get(k) != want.get(k))
        raise UserError(f"{path}: tensors do not fit arch={exp['config'].arch} with "
                        f"d_in={exp['d_in']}: " + "; ".join(
                            f"{k} is {_describe(got.get(k))}, expected {_describe(want.get(k))}"
                            for k in wrong))
    params = {k: jnp.asarray(v) for k, v in exp["params"].items()}
    return SAE(exp["config"], params, exp["input_scale"], exp["step"], exp["target_scale"])


def _describe(tensor: tuple | None) -> str:
    """`float32[64, 32]` for a (shape, dtype) pair; `absent` for None."""
    return "absent" if tensor is None else f"{tensor[1]}{list(tensor[0])}"
