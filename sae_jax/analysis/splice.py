"""A cross-layer transcoder (`saes.clt`) standing in for every MLP of its layers at once,
inside one forward pass: what `fidelity` and `loss_recovered` splice for a CLT run.

A CLT's prediction of layer p's MLP output sums the decoders of its latents of layers ≤ p,
and a layer's latents read that layer's MLP input alone. So the spliced pass computes it as
it goes: when the pass reaches the p-th CLT layer, the latents of that layer are encoded from
its MLP input *as the patched pass computed it* (every earlier MLP already replaced), added to
the codes of the layers before, and decoded into the replacement of that MLP's output. The
model hooks (`minilm.forward`'s `replace=(layers, fn, "mlp")`, `transformer.forward`'s
`hook=(layers, "mlp", fn)`) call `fn(layer, inp, out)` at each layer in order.
"""

from __future__ import annotations

import jax.numpy as jnp

from sae_jax.errors import UserError
from sae_jax.sae import SAE
from sae_jax.saes import clt


def is_clt(sae: SAE) -> bool:
    return clt.is_clt(sae.config)


def check_one_layer(sae: SAE, meta: dict) -> None:
    """Only a CLT splices a multi-layer store: anything else needs the store's one `layer`."""
    if "layer" not in meta and not is_clt(sae):
        raise UserError(f"this {sae.config.arch} run cannot stand in for the layers "
                        f"{meta.get('layers')} at once; a multi-layer MLP store is spliced by a "
                        "cross-layer transcoder (arch=clt_topk or clt_jumprelu)")


def clt_layers(sae: SAE, meta: dict) -> tuple[int, ...]:
    """The model layers a CLT run spans, from its store's `layers` (the single `layer` of a
    one-layer pair store), checked against the run's own layer count."""
    layers = tuple(int(v) for v in meta.get("layers", [meta.get("layer")]) if v is not None)
    if len(layers) != clt.n_layers(sae.config):
        raise UserError(f"this CLT spans {clt.n_layers(sae.config)} layers, but its store "
                        f"records layers {list(layers)}")
    return layers


class CrossLayerSplice:
    """One CLT's replacements within one traced pass (module docstring); it keeps the codes
    of the layers already reached, so use a fresh one per variant and per pass."""

    def __init__(self, sae: SAE):
        self.sae, self.f = sae, 0.0
        self.layers = clt.n_layers(sae.config)
        self.d = sae.d_in // self.layers

    def __call__(self, p: int, inp):
        """The predicted MLP output `(..., d)` (raw units) of the CLT's p-th layer, from that
        layer's MLP input `inp (..., d)`. The other input blocks of the row are zero: no
        layer-p latent reads them. (Each call encodes and decodes whole rows: L× the work of
        one layer, which an eval can afford.)"""
        d, lo = self.d, p * self.d
        flat = inp.reshape(-1, d).astype(jnp.float32)
        row = jnp.zeros((flat.shape[0], self.layers * d), jnp.float32).at[:, lo:lo + d].set(flat)
        own = jnp.arange(self.sae.width) % self.layers == p
        self.f = self.f + jnp.where(own, self.sae.encode_raw(row), 0.0)
        out = self.sae.reconstruct_raw(row, self.f)
        return out[:, lo:lo + d].reshape(inp.shape)
