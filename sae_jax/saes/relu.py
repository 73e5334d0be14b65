"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Update on training SAEs",
April 2024).

The decoder is not norm-constrained; instead the penalty charges f_i·‖W_dec,i‖, so the
model cannot shrink activations by growing decoder rows. Decoder rows start small
(`init_norm`), `W_enc = W_decᵀ`, `b_dec` = data mean, and λ warms up over the first steps.
"""

from __future__ import annotations

import jax

from sae_jax.saes.common import Architecture, Code, init_dictionary, pre_activations


def init(key, cfg, d_in: int, data_mean=None):
    return init_dictionary(key, d_in, cfg.width, cfg.init_norm, data_mean)


def encode(params, x, cfg, mesh=None) -> Code:
    pre = pre_activations(params, x, cfg, mesh)
    return Code(pre, jax.nn.relu(pre), {})


ARCH = Architecture(
    name="relu",
    init=init,
    encode=encode,
    defaults={"penalty": "l1", "sparsity_coeff": 2.0},
)
