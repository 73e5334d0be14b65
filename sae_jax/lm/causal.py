"""A causal language model loaded from a local Hugging Face folder, sharded over the mesh.

`load(path, dtype=None, mesh=None)` reads `config.json`, the safetensors weights and
`tokenizer.json`, places each weight on the devices as it is read (heads and MLP split over
the mesh's "model" axis, batches over "data"), and returns a `CausalLM`:
`m.tokenizer`, `m.residual(ids, layer)`, `m.activations(ids, layer, site)`,
`m.logits(ids)` and `m.generate(ids, n)`, all taking int `(B, T)` ids without padding and
returning float32 numpy.

**Sharding.** Column-parallel q/k/v, gate and up projections (`P(None, "model")`), row-parallel
o and down (`P("model", None)`), the vocabulary split over "model" too; XLA inserts the two
all-reduces per block. A dimension the model axis does not divide stays replicated. On paper
Gemma-2-9B (9.2B params) in bf16 is 18.5 GB, 2.3 GB per chip of a v5e-8 (16 GB each).

**BOS.** Sequences start with the model's BOS token when its config names one (GPT-2's
`<|endoftext|>` included, as TransformerLens and SAELens do), so every harvested context
looks like the start of a document to the model; `special_ids` marks it so harvest keeps it
out of training rows by default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax.errors import UserError
from sae_jax.lm import families, hf, transformer
from sae_jax.lm.corpus import Specials
from sae_jax.lm.transformer import Arch
from sae_jax.mesh import make_mesh

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COLUMN = ("q", "k", "v", "gate", "up")  # split the output features over "model"
ROW = ("o", "down")  # split the input features over "model"


def _dtype(dtype) -> jnp.dtype:
    if dtype is None:  # exact on CPU, the accelerators' native type elsewhere
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    name = {"f32": "float32", "bf16": "bfloat16"}.get(name, name)
    if name not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[name]


def param_spec(path: tuple, shape: tuple, model: int) -> P:
    """Where a weight lives on the mesh (module docstring), from its place in the pytree."""
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    owner, leaf = (keys[-2] if len(keys) > 1 else None), keys[-1]

    def split(axis: int) -> P:
        if shape[axis] % model:
            return P()
        return P(*[("model" if i == axis else None) for i in range(len(shape))])

    if owner in COLUMN:
        return split(len(shape) - 1)
    if owner in ROW and leaf == "w":
        return split(0)
    if leaf == "embed":
        return split(0)
    if leaf == "unembed":
        return split(1)
    return P()


def check_shapes(arch: Arch, params: dict) -> None:
    """Refuses weights whose shapes disagree with config.json, naming the first one."""
    d, hd = arch.d_model, arch.head_dim
    want = {"q": (d, arch.n_heads * hd), "k": (d, arch.n_kv_heads * hd),
            "v": (d, arch.n_kv_heads * hd), "o": (arch.n_heads * hd, d),
            "up": (d, arch.d_mlp), "gate": (d, arch.d_mlp), "down": (arch.d_mlp, d)}
    found = [("embed", params["embed"].shape, (arch.vocab_size, d))]
    for i, layer in enumerate(params["layers"]):
        found += [(f"layers.{i}.{k}", layer[k]["w"].shape, w) for k, w in want.items()
                  if k in layer]
    for name, got, expected in found:
        if tuple(got) != expected:
            raise UserError(f"weight {name} has shape {tuple(got)}, but config.json implies "
                            f"{expected}")


@dataclass(frozen=True, eq=False)
class CausalLM:
    """A loaded causal LM (see the module docstring). `params` are device arrays."""

    arch: Arch
    params: dict
    tokenizer: object
    mesh: object
    name: str
    path: str
    config: dict

    @property
    def d_model(self) -> int:
        return self.arch.d_model

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def specials(self) -> Specials:
        """BOS frames each sequence; no end token; padding with pad, else EOS, else 0."""
        c = families.text_config(self.config)
        pad = next((i for i in (c.get("pad_token_id"), c.get("eos_token_id"))
                    if isinstance(i, int)), 0)
        bos = c.get("bos_token_id")
        return Specials(bos if isinstance(bos, int) else None, None, pad)

    @property
    def special_ids(self) -> set[int]:
        s = self.specials
        return {i for i in (s.cls, s.pad) if i is not None}

    def _batch(self, ids) -> tuple[jax.Array, int]:
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"ids must be an int array (B, T), got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.arch.vocab_size):
            raise UserError(f"token ids must be in 0..{self.arch.vocab_size - 1}")
        if self.arch.rope is None and ids.shape[1] > self.arch.max_positions:
            raise UserError(f"{ids.shape[1]} tokens exceed this model's "
                            f"{self.arch.max_positions} positions")
        n = len(ids)
        data = self.mesh.shape["data"]
        padded = np.zeros((-(-n // data) * data, ids.shape[1]), np.int32)
        padded[:n] = ids
        return jax.device_put(padded, NamedSharding(self.mesh, P("data", None))), n

    def activations(self, ids, layer: int, site: str = "resid") -> np.ndarray:
        """float32 `(B, T, width)` at `site` of block `layer` (pair sites: input ++ output)."""
        transformer.check_site(self.arch, layer, site)
        batch, n = self._batch(ids)
        out = _capture_fn(self.arch, layer, site)(self.params, batch)
        return np.asarray(out, np.float32)[:n]

    def residual(self, ids, layer: int) -> np.ndarray:
        """The residual stream after block `layer` (0-based): Hugging Face's
        `hidden_states[layer + 1]` (for the last block: before the final norm)."""
        return self.activations(ids, layer, "resid")

    def residuals(self, ids) -> np.ndarray:
        """Every block's output at once, float32 `(n_layers, B, T, d)`:
        `residuals(ids)[l] == residual(ids, l)`."""
        batch, n = self._batch(ids)
        return np.asarray(_stream_fn(self.arch)(self.params, batch), np.float32)[:, :n]

    def logits(self, ids, hook=None, hook_args=()) -> np.ndarray:
        """float32 `(B, T, vocab)`; `hook=(layer, site, fn)` edits the stream on the way with
        `fn(value, *hook_args)` (`hook_args` are traced, so one compile serves many values)."""
        batch, n = self._batch(ids)
        hook_args = self._replicated(hook_args)
        return np.asarray(_logits_fn(self.arch, hook)(self.params, batch, hook_args))[:n]

    def _replicated(self, tree):
        """Hook arguments (an SAE, arrays) on every device of the mesh, next to the weights
        (a loaded SAE sits on one device)."""
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def generate(self, ids, max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
                 hook=None, hook_args=()) -> np.ndarray:
        """`ids` followed by `max_new_tokens` tokens: greedy, or sampled at `temperature`.

        Every step reruns the whole fixed-length buffer (one compiled shape, no KV cache):
        right for the short continuations steering shows, quadratic for long ones."""
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = np.asarray(ids)
        b, t0 = ids.shape
        buf = np.full((b, t0 + max_new_tokens), self.specials.pad, np.int32)
        buf[:, :t0] = ids
        key = jax.random.PRNGKey(seed)
        step = _logits_fn(self.arch, hook)
        hook_args = self._replicated(hook_args)
        for t in range(t0, t0 + max_new_tokens):
            batch, _ = self._batch(buf)
            last = np.asarray(step(self.params, batch, hook_args)[:, t - 1])[:b]
            if temperature > 0:
                key, sub = jax.random.split(key)
                nxt = np.asarray(jax.random.categorical(sub, jnp.asarray(last) / temperature))
            else:
                nxt = last.argmax(-1)
            buf[:, t] = nxt
        return buf


@functools.lru_cache(maxsize=32)
def _capture_fn(arch: Arch, layer: int, site: str):
    return jax.jit(functools.partial(transformer.activations, arch, layer=layer, site=site))


@functools.lru_cache(maxsize=8)
def _stream_fn(arch: Arch):
    return jax.jit(functools.partial(transformer.residual_stream, arch))


@functools.lru_cache(maxsize=32)
def _logits_fn(arch: Arch, hook):
    def run(params, ids, hook_args):
        live = None if hook is None else (hook[0], hook[1],
                                          lambda *v: hook[2](*v, *hook_args))
        return transformer.forward(arch, params, ids, hook=live)
    return jax.jit(run)


def place(arch: Arch, weights: dict, mesh, dtype) -> dict:
    """The params pytree on the devices, one tensor at a time (module docstring)."""
    model = mesh.shape["model"]

    def put(path, array):
        spec = param_spec(path, array.shape, model)
        return jax.device_put(np.asarray(array, dtype=dtype), NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(put, weights)


def load(path, dtype=None, mesh=None) -> CausalLM:
    """A causal LM from a local Hugging Face folder (module docstring).

    Args:
      path: the folder (`config.json`, `*.safetensors`, `tokenizer.json`).
      dtype: "float32" or "bfloat16" (default: float32 on CPU, bfloat16 on accelerators).
      mesh: a `("data", "model")` mesh (default: every device on "data").
    """
    folder = Path(path)
    config = hf.read_config(folder)
    arch = families.arch_from_config(config)
    weights = families.params_from_weights(arch, hf.read_weights(folder))
    check_shapes(arch, weights)
    mesh = make_mesh() if mesh is None else mesh
    params = place(arch, weights, mesh, np.dtype(_dtype(dtype)))
    name = config.get("_name_or_path") or folder.resolve().name
    return CausalLM(arch, params, hf.load_tokenizer(folder), mesh, str(name), str(folder),
                    config)
