"""Cross-layer transcoders (CLTs; Ameisen et al. 2025, "Circuit Tracing"; Anthropic's
crosscoder note): latents at layer l read the MLP input of layer l and write to the MLP
outputs of layers l, l+1, …, L−1, one decoder block per target layer; the loss is the sum of
the L target reconstructions.

They train on a CLT store (`harvest --pair mlp --layers ...`): each row is
`[mlp_in.l1 | … | mlp_in.lL | mlp_out.l1 | … | mlp_out.lL]`, so a CLT is a transcoder from the
L input blocks (d_in = L·d) to the L target blocks (d_out = L·d). `cfg.sources` holds the 2L
block widths (from the store's `meta.sources`, by `rundir.data_widths`); a single-layer pair
store is a CLT of L = 1, i.e. a plain transcoder.

Layout (params stay a flat dict, the latent axis sharded over "model" like everywhere):

- **Latent i belongs to layer i mod L** (interleaved): every device's contiguous slice of
  latents then holds F/(L·model) latents of each layer, so nothing below moves data between
  devices. `width` must divide by L, and width/L by the model axis.
- **Encoder `W_enc (L·d, F/L)`**: column j, row block l is the encoder of latent j·L + l,
  which reads input block l only. `pre = einsum(x (b, L, d), W_enc (L, d, F/L))`: the cost
  and memory of one layer's SAE, not the L× of a dense block-diagonal `(L·d, F)`.
- **Decoder `W_dec (F, L·d)`**, with the causal block mask `(i mod L) ≤ t` on target block t
  (`decoder_mask`): the masked blocks are exactly zero at init, the loss reads W_dec through
  the mask so their gradient is exactly zero, and Adam, the unit-norm projection and the
  row normalisation all keep zeros zero. So every consumer of `W_dec` (decode, eval, AuxK,
  export) is correct without knowing about the mask. Cost: (L−1)/(2L) of W_dec (about half
  for large L) is stored and multiplied as zeros, and one elementwise mask multiply per step.

Two activations:

- `clt_topk`: each layer's latents keep their own k largest (so L·k per row), because a
  layer's code must depend on that layer's input alone: the spliced evaluation computes
  layer l's code during the patched forward pass, before later layers exist. Selection is
  on unit-norm decoder rows over all target blocks (as the crosscoder's TopK). AuxK is the
  plain TopK's, over all dead latents. Training uses the dense path (the sparse TopK
  step's encoder VJP assumes one encoder for the whole row).
- `clt_jumprelu`: per-latent thresholds (`saes.jumprelu`), unit-norm decoder rows over all
  target blocks, and by default the `tanh` penalty (circuit tracing's) on f_i weighted by
  Σ_t ‖W_dec,i^t‖, the summed per-target decoder norms (`crosscoder_norm=sum`; `l2`: the norm
  of the concatenation, as Ameisen et al. write it): with unit-norm rows, that sum is 1 for a
  latent writing to one layer and up to √(#targets) when it spreads, so it pays for reach.

Scaling is outside the architecture: each input and target block gets its own scale (the
per-source scales of `sae_jax.scales`), so layers of different norms weigh equally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.errors import UserError
from sae_jax.saes import jumprelu, topk
from sae_jax.saes.common import Architecture, Code, compute_dtype, constrain
from sae_jax.saes.select import topk_mask


def n_layers(cfg) -> int:
    """L: the layers a CLT spans (half its sources: inputs then targets); 1 when unset."""
    return len(cfg.sources) // 2 if cfg.sources else 1


def check(cfg) -> None:
    """One-line refusals of what a CLT cannot be (called again once the store's sources
    are known)."""
    if cfg.transcoder is False:
        raise UserError(f"arch={cfg.arch} is a cross-layer transcoder: it trains on a store "
                        "of MLP input/output pairs (`sae-jax harvest --pair mlp --layers ...`)")
    if cfg.skip_connection:
        raise UserError(f"skip_connection is not built for arch={cfg.arch} yet")
    if not cfg.sources:
        return
    widths = cfg.sources
    if len(widths) % 2 or len(set(widths)) != 1:
        raise UserError(f"arch={cfg.arch} needs sources = L input blocks then L target "
                        f"blocks, all of one width; got {','.join(map(str, widths))}")
    layers = n_layers(cfg)
    if cfg.width % layers:
        raise UserError(f"width={cfg.width} must divide by the CLT's {layers} layers")
    if cfg.arch == "clt_topk" and cfg.k > cfg.width // layers:
        raise UserError(f"k={cfg.k} (per layer) must be <= width/layers = "
                        f"{cfg.width // layers}")


def decoder_mask(cfg, d_out: int) -> jax.Array:
    """(F, d_out) float32: 1 where latent i (layer i mod L) may write, target block t ≥ its
    layer; built from iotas, so under `jit` it fuses into the multiply."""
    layers = n_layers(cfg)
    layer_of = jnp.arange(cfg.width) % layers
    target_of = jnp.arange(d_out) // (d_out // layers)
    return (layer_of[:, None] <= target_of[None, :]).astype(jnp.float32)


def init_encoder(key, cfg, d_in: int, data_mean=None):
    """`W_enc (L·d, F/L)` of unit-norm per-layer encoder vectors, `b_enc` zero, and a
    placeholder unit-norm `W_dec (F, d)` whose row norms `saes.init` carries over when it
    draws the masked decoder in the target space (`common.transcoder_params`)."""
    del data_mean  # a transcoder's b_dec lives in the target space: set by transcoder_params
    layers = n_layers(cfg)
    d = d_in // layers
    w = jax.random.normal(key, (layers, d, cfg.width // layers), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    return {"W_enc": w.reshape(d_in, cfg.width // layers),
            "b_enc": jnp.zeros((cfg.width,), jnp.float32),
            "W_dec": jnp.ones((cfg.width, 1), jnp.float32),
            "b_dec": jnp.zeros((d,), jnp.float32)}


def pre_activations(params, x, cfg, mesh=None):
    """`pre[:, j·L + l] = x_l @ W_enc[l-block, j] + b_enc`, (batch, F) sharded like every
    architecture's: one einsum over the layer axis, no block-diagonal matrix."""
    layers = n_layers(cfg)
    d_in, per_layer = params["W_enc"].shape
    xs = x.reshape(x.shape[0], layers, d_in // layers)
    w = params["W_enc"].reshape(layers, d_in // layers, per_layer)
    dtype = compute_dtype(cfg.compute_dtype)
    pre = jnp.einsum("bld,ldj->bjl", xs.astype(dtype), w.astype(dtype),
                     preferred_element_type=jnp.float32)
    pre = pre.reshape(x.shape[0], cfg.width) + params["b_enc"]
    return constrain(pre, mesh, ("batch", "latent"))


def per_layer_topk_mask(pre, cfg, mesh=None):
    """Each layer's k largest pre-activations per row: the (batch, F/L, L) view transposed to
    (batch·L, F/L) rows, so `select.topk_mask` (sharded or not) ranks each layer alone."""
    layers = n_layers(cfg)
    b = pre.shape[0]
    rows = pre.reshape(b, -1, layers).transpose(0, 2, 1).reshape(b * layers, -1)
    keep = topk_mask(rows, cfg.k, mesh)
    return keep.reshape(b, layers, -1).transpose(0, 2, 1).reshape(b, -1)


def topk_encode(params, x, cfg, mesh=None) -> Code:
    pre = pre_activations(params, x, cfg, mesh)
    keep = per_layer_topk_mask(pre, cfg, mesh)
    return Code(pre, jnp.where(keep, jax.nn.relu(pre), 0.0), {})


def jumprelu_encode(params, x, cfg, mesh=None) -> Code:
    pre = pre_activations(params, x, cfg, mesh)
    return Code(pre, jumprelu.jumprelu(pre, jumprelu.threshold(params), cfg.bandwidth), {})


def jumprelu_init(key, cfg, d_in: int, data_mean=None):
    params = init_encoder(key, cfg, d_in, data_mean)
    params["log_threshold"] = jnp.full((cfg.width,), jnp.log(cfg.threshold_init), jnp.float32)
    return params


TOPK_ARCH = Architecture(
    name="clt_topk", init=init_encoder, encode=topk_encode, aux_loss=topk.auxk_loss,
    defaults={"penalty": "none", "sparsity_coeff": 0.0}, unit_norm_decoder=True,
    check=check, crosscoder=True, decoder_mask=decoder_mask)
JUMPRELU_ARCH = Architecture(
    name="clt_jumprelu", init=jumprelu_init, encode=jumprelu_encode,
    defaults={"penalty": "tanh", "sparsity_coeff": 1.0},
    extra_axes={"log_threshold": ("latent",)}, unit_norm_decoder=True,
    check=check, crosscoder=True, decoder_mask=decoder_mask)
ARCHS = (TOPK_ARCH, JUMPRELU_ARCH)


def is_clt(cfg) -> bool:
    return cfg.arch in (a.name for a in ARCHS)
