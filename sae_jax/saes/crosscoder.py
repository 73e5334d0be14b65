"""Crosscoders (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model
Diffing", Anthropic's circuits update): one dictionary read from and written to several
sources at once, e.g. the same layer of a base and a fine-tuned model.

Each store row is the sources side by side, `x = [x_1 | x_2 | ... | x_S]` of width
D = Σ d_s, in the order of `cfg.sources` (filled from the store's `meta["sources"]` by
`rundir.data_widths`). One encoder reads the whole row; source s's decoder is the column
block `W_dec[:, o_s : o_s + d_s]` of one `W_dec (F, D)`. That representation, rather than a
`(S, F, d)` stack or one param per source, is chosen because:

- the latent axis stays W_dec's first axis, sharded over "model" by `BASE_AXES` exactly as in
  every architecture, and sources may have different widths (a stack needs one d);
- `decode` (`f @ W_dec + b_dec`) is the reconstruction of every source at once, so the SAE
  API, `sae-jax eval` (FVU over the whole row = Σ_s errors / Σ_s variances), checkpoints,
  resume and the loader need no change;
- the loss's ‖x − x̂‖² over the row *is* the crosscoder's Σ_s ‖x_s − x̂_s‖².

Only the penalty and the diff analysis need the split, which is static config
(`common.source_norms`). The sparsity penalty weighs latent i by Σ_s ‖W_dec,i^s‖ (the note's
choice, `crosscoder_norm=sum`), so a latent pays for every source it writes to and exclusive
features stay exclusive; `crosscoder_norm=l2` uses ‖W_dec,i‖ over all sources instead.

Three activations, three registry names (each is the plain architecture's code, so every
mesh, the sparse TopK step, AuxK and the BatchTopK threshold work unchanged):

- `crosscoder`: ReLU with the norm-weighted L1 penalty above (the paper's recipe);
- `crosscoder_topk`, `crosscoder_batchtopk`: TopK / BatchTopK selection on the
  pre-activations with unit-norm decoder rows over all sources, i.e. the L2 weighting (how
  the norm divides between sources stays free, which is what the diff reads).

With no sources (a plain store and `sources` unset) the row is one source, and each is
exactly its plain architecture. Input scaling is one scalar for the whole row, so sources of
very different norms should be brought to comparable norms before import (docs).
"""

from __future__ import annotations

import dataclasses

from sae_jax.errors import UserError
from sae_jax.saes import batchtopk, relu, topk
from sae_jax.saes.common import Architecture


def source_widths(cfg, d_in: int) -> tuple[int, ...]:
    """The width of each source in a row of width `d_in` (one source when unset)."""
    return tuple(cfg.sources) if cfg.sources else (d_in,)


def check(cfg) -> None:
    if cfg.transcoder:
        raise UserError("crosscoders read plain or multi-source rows, not transcoder pairs "
                        "(for a multi-layer MLP pair store: arch=clt_topk or clt_jumprelu)")


def _init_with(plain_init):
    """`plain_init`, after checking that the sources add up to the row width."""

    def init(key, cfg, d_in: int, data_mean=None):
        if sum(source_widths(cfg, d_in)) != d_in:
            raise UserError(f"sources {','.join(map(str, cfg.sources))} add up to "
                            f"{sum(cfg.sources)}, but the rows have width {d_in}")
        return plain_init(key, cfg, d_in, data_mean)

    return init


def _crosscoder(plain: Architecture, name: str) -> Architecture:
    return dataclasses.replace(plain, name=name, init=_init_with(plain.init), check=check,
                               crosscoder=True)


RELU_ARCH = _crosscoder(relu.ARCH, "crosscoder")
TOPK_ARCH = _crosscoder(topk.ARCH, "crosscoder_topk")
BATCHTOPK_ARCH = _crosscoder(batchtopk.ARCH, "crosscoder_batchtopk")
ARCHS = (RELU_ARCH, TOPK_ARCH, BATCHTOPK_ARCH)
