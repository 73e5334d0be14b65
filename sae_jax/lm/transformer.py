"""One decoder-only transformer, as pure JAX functions, that is GPT-2, Llama, Mistral, Qwen2/3,
Gemma 2 and Gemma 3 depending on a frozen `Arch`.

The families differ in a handful of switches (how they normalise, where they put norms,
what positions they use, soft-capping, local attention), not in structure: every block is
`h += attn(norm(h)); h += mlp(norm(h))`. So there is one forward pass and one table of
switches per family (`sae_jax.lm.families` builds an `Arch` and the params from a Hugging
Face folder), rather than one copy of attention per family.

**Hook sites** of block `layer` (0-based), what an SAE reads and splices:
* `resid`: the residual stream after the block (Hugging Face's `hidden_states[layer + 1]`,
  before the final norm even for the last block);
* `attn_out` / `mlp_out`: what the attention / MLP sub-layer adds to the stream (after
  Gemma's post-norms);
* transcoder pairs: `mlp` (the MLP's normalised input -> `mlp_out`) and `block` (the stream
  before the block -> after it).

`forward(..., hook=(layer, site, fn))` replaces the value at a site by `fn(value)` (for the
pair sites `fn(input, output) -> output`) before the rest of the model reads it; `capture`
returns the value at a site and runs no further block.

Numerics follow transformers: norms, softmax and soft-capping in float32, matmuls in the
params' dtype, at `Precision.HIGHEST` in float32 so accelerators match the reference.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.errors import UserError

SITES = ("resid", "attn_out", "mlp_out")
PAIR_SITES = ("mlp", "block")
NORMS = ("layernorm", "rmsnorm", "rmsnorm_plus_one")
ACTIVATIONS = {"gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "silu": jax.nn.silu, "relu": jax.nn.relu}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Rope:
    """Rotary positions of one attention kind: base, scaling type and its parameters."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class Arch:
    """Everything the forward pass needs besides the weights; hashable, so static under jit.

    `layer_types[i]` is "full" or "sliding" (attention limited to the last `sliding_window`
    positions, with `rope_local` if given). `rope` None means learned positions (GPT-2).
    """

    model_type: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    norm: str
    norm_eps: float
    activation: str
    gated_mlp: bool
    tied_embeddings: bool
    layer_types: tuple[str, ...]
    rope: Rope | None = None
    rope_local: Rope | None = None
    max_positions: int = 2048
    attn_scale: float | None = None  # default 1/sqrt(head_dim)
    qk_norm: bool = False
    post_norms: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None
    sliding_window: int | None = None

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5


Hook = tuple  # (layer, site, fn)


def check_site(arch: Arch, layer: int, site: str) -> None:
    if site not in SITES + PAIR_SITES:
        raise UserError(f"hook site must be one of {', '.join(SITES + PAIR_SITES)}, "
                        f"got {site!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < arch.n_layers:
        raise UserError(f"layer must be in 0..{arch.n_layers - 1} for this "
                        f"{arch.n_layers}-layer {arch.model_type} model, got {layer}")


# ---------------------------------------------------------------------------- pieces


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dense(p: dict, x: jax.Array) -> jax.Array:
    y = jnp.matmul(x, p["w"], precision=_precision(p["w"].dtype))
    return y + p["b"] if "b" in p else y


def _norm(arch: Arch, p: dict, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if arch.norm == "layernorm":
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + arch.norm_eps)
        return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
                ).astype(x.dtype)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + arch.norm_eps)
    if arch.norm == "rmsnorm_plus_one":  # Gemma: scale by (1 + w), all in float32
        return (y * (1.0 + p["scale"].astype(jnp.float32))).astype(x.dtype)
    return p["scale"] * y.astype(x.dtype)  # Llama: cast back, then scale


def inverse_frequencies(rope: Rope, head_dim: int) -> np.ndarray:
    """RoPE's per-pair frequencies, with Hugging Face's "linear" and "llama3" scaling."""
    inv = 1.0 / rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = ((rope.original_max_positions / wavelen - rope.low_freq_factor)
                  / (rope.high_freq_factor - rope.low_freq_factor))
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)
    return inv


def _rotate(x: jax.Array, rope: Rope) -> jax.Array:
    """RoPE on `x (B, T, heads, head_dim)` at positions 0..T-1, halves convention (HF)."""
    inv = inverse_frequencies(rope, x.shape[-1]).astype(np.float32)
    angles = np.arange(x.shape[1], dtype=np.float32)[:, None] * inv[None]
    angles = np.concatenate([angles, angles], -1)[None, :, None, :]
    cos, sin = jnp.asarray(np.cos(angles), x.dtype), jnp.asarray(np.sin(angles), x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def _attention(arch: Arch, p: dict, x: jax.Array, kind: str) -> jax.Array:
    b, t, _ = x.shape
    hd, kv = arch.head_dim, arch.n_kv_heads
    q = _dense(p["q"], x).reshape(b, t, arch.n_heads, hd)
    k = _dense(p["k"], x).reshape(b, t, kv, hd)
    v = _dense(p["v"], x).reshape(b, t, kv, hd)
    if arch.qk_norm:
        q, k = _norm(arch, p["q_norm"], q), _norm(arch, p["k_norm"], k)
    if arch.rope is not None:
        rope = arch.rope_local if kind == "sliding" and arch.rope_local else arch.rope
        q, k = _rotate(q, rope), _rotate(k, rope)
    q = q.reshape(b, t, kv, arch.n_heads // kv, hd)  # grouped-query: heads share kv
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, precision=_precision(q.dtype),
                        preferred_element_type=jnp.float32) * arch.scale
    scores = _softcap(scores, arch.attn_softcap)
    qpos, kpos = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = kpos <= qpos
    if kind == "sliding" and arch.sliding_window:
        allowed &= qpos - kpos < arch.sliding_window
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v, precision=_precision(v.dtype))
    return _dense(p["o"], out.reshape(b, t, arch.n_heads * hd))


def _mlp(arch: Arch, p: dict, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[arch.activation]
    hidden = act(_dense(p["gate"], x)) * _dense(p["up"], x) if arch.gated_mlp else \
        act(_dense(p["up"], x))
    return _dense(p["down"], hidden)


def embed(arch: Arch, params: dict, ids: jax.Array) -> jax.Array:
    """The stream before block 0: token (and GPT-2's learned position) embeddings."""
    h = params["embed"][ids]
    if arch.embed_scale is not None:
        h = h * jnp.asarray(arch.embed_scale, h.dtype)
    if "positions" in params:
        h = h + params["positions"][: ids.shape[1]]
    return h


def unembed(arch: Arch, params: dict, h: jax.Array) -> jax.Array:
    """float32 next-token logits from the residual stream after the last block."""
    h = _norm(arch, params["final_norm"], h)
    w = params["embed"].T if arch.tied_embeddings else params["unembed"]
    logits = jnp.matmul(h, w, precision=_precision(h.dtype),
                        preferred_element_type=jnp.float32)
    return _softcap(logits, arch.final_softcap)


# ---------------------------------------------------------------------------- forward


def forward(arch: Arch, params: dict, ids: jax.Array, *, hook: Hook | None = None,
            capture: tuple[tuple[int, str], ...] = ()):
    """The model on `ids (B, T)` (no padding, or right padding: attention is causal).

    Args:
      hook: `(layer, site, fn)`: the value at `site` of block `layer` is replaced by
        `fn(value)` (pair sites: `fn(input, output) -> output`) before the model reads on;
        with a tuple of layers, by `fn(layer, value)` (`fn(layer, input, output)`) at each of
        them, in order, in this one pass (a cross-layer transcoder's splice).
      capture: `((layer, site), ...)`: return the values there (a tuple, in this order)
        instead of logits (pair sites: input and output concatenated on the last axis),
        running no block after the last of these layers.

    Returns:
      float32 logits `(B, T, vocab)`, or the captured activations in the params' dtype.
    """
    hooked = () if hook is None else hook[0] if isinstance(hook[0], tuple) else (hook[0],)
    for layer, site in (*((i, hook[1]) for i in hooked), *capture):
        check_site(arch, layer, site)
    captured = {}

    def at(layer: int, site: str, *values):
        if (layer, site) in capture:
            captured[layer, site] = (jnp.concatenate(values, -1) if len(values) > 1
                                     else values[-1])
        if hook is not None and site == hook[1] and layer in hooked:
            return (hook[2](layer, *values) if isinstance(hook[0], tuple)
                    else hook[2](*values))
        return values[-1]

    h = embed(arch, params, ids)
    for i, p in enumerate(params["layers"]):
        h = _block(arch, p, h, arch.layer_types[i], functools.partial(at, i))
        if capture and len(captured) == len(set(capture)):
            # XLA drops whatever the rest of this block computed after the sites
            return tuple(captured[c] for c in capture)
    return unembed(arch, params, h)


def _block(arch: Arch, p: dict, h: jax.Array, kind: str, at) -> jax.Array:
    before = h
    a = _attention(arch, p, _norm(arch, p["attn_norm"], h), kind)
    if arch.post_norms:
        a = _norm(arch, p["attn_post_norm"], a)
    h = h + at("attn_out", a)
    x = _norm(arch, p["mlp_norm"], h)
    m = _mlp(arch, p, x)
    if arch.post_norms:
        m = _norm(arch, p["mlp_post_norm"], m)
    m = at("mlp_out", at("mlp", x, m))
    return at("resid", at("block", before, h + m))


def activations(arch: Arch, params: dict, ids: jax.Array, layer: int,
                site: str = "resid") -> jax.Array:
    """The value at `site` of block `layer` (`forward`'s `capture`), computing only blocks
    0..layer: what harvest stores."""
    return forward(arch, params, ids, capture=((layer, site),))[0]


def residual_stream(arch: Arch, params: dict, ids: jax.Array) -> jax.Array:
    """Every block's output, `(n_layers, B, T, d)`, in one pass."""
    return jnp.stack(forward(arch, params, ids,
                             capture=tuple((i, "resid") for i in range(arch.n_layers))))

