"""Equal-shape sweep members trained as one `jax.vmap`ped step (`--batch-members`).

A sweep's members normally each run their own step inside one jitted program: N narrow
matmuls. Members whose configs differ only in `BATCHABLE_KEYS` have params of equal shapes
and the same program up to a few numbers, so their states can be stacked on a leading
member axis and stepped by one `vmap` of the ordinary train step (`step.make_train_step`):
the encoder and decoder matmuls become one batched matmul over the members.

* `seed` only sets the initial state, which is stacked like any other.
* `lr` and `sparsity_coeff` enter the step only as numbers multiplied into traced values
  (the learning-rate schedule and the penalty ramp), so each member's own value is passed
  in as a vmapped scalar (`_with_numbers`); the optimizer state keeps its layout.
* `k` does not batch: `top_k` needs a static k, and members of different k have codes of
  different shapes. Neither does anything else (width, arch, penalty, ...).

Not bitwise: on XLA:CPU a batched member equals its separate run only to float32 rounding,
amplified by Adam (an entry whose gradient is near zero can step ±lr on rounding noise):
after 20 steps ~1e-6 of the largest entry for TopK, ~1e-3 for ReLU. XLA compiles the
member-batched program differently: 3-D reductions go to YNNPACK reduce fusions where the
2-D ones do not, and the algebraic simplifier rewrites `t / broadcast(norm[N])` (optax's
`clip_by_global_norm`) into `t * broadcast(1 / norm)` for a per-member norm but not for a
scalar one. Batching is therefore opt-in; the default sweep keeps its bitwise contract.

The member axis of every stacked leaf is replicated; the other axes keep their own
sharding (the dictionary axis over "model", so stacked params split as the member's do).
Checkpoints stay per member: the loop (`lifecycle.GroupedStep.sync`) unstacks each member's
own state before a save, so every member is still an ordinary run directory.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax.config import TrainConfig
from sae_jax.training.step import make_optimizer, make_train_step

BATCHABLE_KEYS = ("seed", "lr", "sparsity_coeff")
"""Config keys in which members of one vmapped group may differ (see the module doc)."""


def batch_groups(cfgs: list[TrainConfig], scales: list | None = None) -> list[list[int]]:
    """Indices of `cfgs` grouped so that each group differs only in `BATCHABLE_KEYS` (and
    shares the data scales, `scales[i]`, when given); groups and members keep their order
    of first appearance. A member alone is a group of one."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        shape = {k: v for k, v in cfg.to_dict().items() if k not in BATCHABLE_KEYS}
        key = json.dumps([shape, None if scales is None else scales[i]], sort_keys=True,
                         default=repr)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def stacked_sharding(sharding: NamedSharding) -> NamedSharding:
    """A member's leaf sharding with a replicated member axis in front."""
    return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def _with_numbers(cfg: TrainConfig, **values) -> TrainConfig:
    """`cfg` with some numeric fields replaced by traced values, without re-validating
    (`__post_init__` cannot compare tracers). Only for tracing a member's step."""
    member = copy.copy(cfg)
    for key, value in values.items():
        object.__setattr__(member, key, value)
    return member


def make_group_step(cfgs: list[TrainConfig], mesh, input_scale: float,
                    target_scale: float | None = None):
    """`step(stacked_state, x) -> (stacked_state, metrics)`: the train step of every member
    of one batchable group, vmapped over the stacked states; metrics have a member axis."""
    lrs = jnp.asarray([c.lr for c in cfgs], jnp.float32)
    coeffs = jnp.asarray([c.sparsity_coeff for c in cfgs], jnp.float32)

    def member_step(state, x, lr, coeff):
        cfg = _with_numbers(cfgs[0], lr=lr, sparsity_coeff=coeff)
        return make_train_step(cfg, make_optimizer(cfg), mesh, input_scale,
                               target_scale)(state, x)

    batched = jax.vmap(member_step, in_axes=(0, None, 0, 0))
    return lambda stacked, x: batched(stacked, x, lrs, coeffs)


def stack_states(states: list, sharding):
    """One stacked state (member axis first, `sharding`) from member states."""
    return jax.jit(lambda s: jax.tree.map(lambda *leaves: jnp.stack(leaves), *s),
                   out_shardings=sharding)(states)


def unstack_states(stacked, shardings: tuple) -> tuple:
    """The member states of a stacked state, each with its member's own `shardings[i]`."""
    split = jax.jit(lambda c: tuple(jax.tree.map(lambda leaf, j=j: leaf[j], c)
                                    for j in range(len(shardings))), out_shardings=shardings)
    return split(stacked)


__all__ = ["BATCHABLE_KEYS", "batch_groups", "make_group_step", "stack_states",
           "stacked_sharding", "unstack_states"]
