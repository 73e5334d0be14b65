"""Training configuration: one frozen dataclass, set from `key=value` pairs.

Every field has a docstring (docs/training.md's key table is generated from the same text by
`describe()`), cross-field rules live in `__post_init__`, and fields left at `None` take the
architecture's recommended default so a user never has to tune to get a useful SAE.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import types
import typing
from typing import Any

from sae_jax import saes
from sae_jax.errors import UserError
from sae_jax.saes import penalties

COMPUTE_DTYPES = ("float32", "bfloat16", "auto")
CROSSCODER_NORMS = ("sum", "l2")
TOPK_ARCHS = ("topk", "batchtopk", "crosscoder_topk", "crosscoder_batchtopk", "clt_topk")
"""Architectures with a per-row (or per-row average) k that must fit in the width."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (data-derived values live in the run dir)."""

    arch: str = "topk"
    """SAE architecture: relu, jumprelu, topk, batchtopk, matryoshka (Matryoshka BatchTopK), or
    a crosscoder over a multi-source store: crosscoder (ReLU), crosscoder_topk or
    crosscoder_batchtopk, or a cross-layer transcoder over a multi-layer MLP pair store:
    clt_topk (k per layer) or clt_jumprelu (docs/crosscoders.md)."""
    width: int = 4096
    """Number of dictionary features F (the SAE's hidden width)."""
    k: int = 32
    """Active features per row for topk, and per row on average for batchtopk."""
    penalty: str | None = None
    """Sparsity penalty: l1, tanh, lp, l0 or none (default: the architecture's own)."""
    sparsity_coeff: float | None = None
    """Weight of the sparsity penalty (default: per architecture)."""
    sparsity_warmup: float = 0.05
    """Fraction of steps over which the penalty weight ramps linearly from 0."""
    bandwidth: float = 0.2
    """JumpReLU straight-through-estimator kernel width (in scaled-input units)."""
    threshold_init: float = 0.5
    """JumpReLU initial threshold (in scaled-input units)."""
    matryoshka_widths: tuple[int, ...] | None = None
    """Nested prefix widths for matryoshka, e.g. 192,768 (width is always the last level;
    default: width/16, width/4, width)."""
    transcoder: bool | None = None
    """Train a transcoder: encode the store's input columns, reconstruct its target columns
    (default: true exactly when the store holds input/target pairs, `harvest --pair`)."""
    sources: tuple[int, ...] | None = None
    """Crosscoders and CLTs only: the widths of the sources side by side in each row, e.g.
    384,384 (default: the store's `sources`, else the whole row as one source, or a pair
    store's input and target: a CLT of one layer)."""
    crosscoder_norm: str = "sum"
    """Crosscoders and CLTs: how a latent's per-source (per-target-layer) decoder norms weigh
    its sparsity penalty: sum (Σ_s ‖W_dec,i^s‖, Lindsey et al. 2024) or l2 (‖W_dec,i‖ over
    all sources)."""
    skip_connection: bool = False
    """Transcoders only: add a learned linear map W_skip from input to target."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss (topk/batchtopk; default d_in // 2)."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK dead-latent loss (topk/batchtopk; 0 turns it off)."""
    dead_tokens: int = 10_000_000
    """A feature that has not fired for this many training tokens counts as dead (and feeds
    AuxK). 10M as in Gao et al. and OpenAI's code: a shorter window calls rare but live
    features dead (at 1M, anything rarer than 1e-6) and spends AuxK on them. Runs much
    shorter than 10M tokens never call anything dead; set it lower there to use AuxK."""
    init_norm: float = 0.1
    """Initial L2 norm of decoder rows for relu (others start at unit norm)."""
    lr: float | None = None
    """Peak Adam learning rate (default 2e-4 / sqrt(width / 16384), sparsify's rule)."""
    lr_warmup: float = 0.01
    """Fraction of steps of linear learning-rate warm-up from 0."""
    lr_decay: float = 0.2
    """Fraction of final steps over which the learning rate decays linearly to 0."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 turns it off)."""
    steps: int = 10_000
    """Number of optimizer steps."""
    batch_size: int = 4096
    """Rows (tokens) per global batch."""
    seed: int = 0
    """Seed for initialisation (and the batch order, unless data_seed is set)."""
    data_seed: int | None = None
    """Seed of the batch order (default: seed). A seed sweep (seed=0,1,2) shares one: the
    first seed listed, so its members differ only in their initialisation."""
    compute_dtype: str = "auto"
    """Matmul input dtype: float32, bfloat16, or auto (bfloat16 on TPU, else float32)."""
    mesh: str = ""
    """Device mesh, e.g. data:2,model:4 (default: data parallel, plus a model axis if needed)."""
    holdout: float = 0.05
    """Fraction of the store's rows (its tail) held out of training for eval."""
    log_every: int = 100
    """Steps between metrics.jsonl records and progress-bar updates."""
    ckpt_every: int = 1000
    """Steps between checkpoints (the final step is always saved)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""

    def __post_init__(self):
        _check_choice("arch", self.arch, saes.ARCHITECTURES)
        arch = saes.ARCHITECTURES[self.arch]
        for key, value in arch.defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.lr is None:
            object.__setattr__(self, "lr", 2e-4 / math.sqrt(self.width / 16384))
        if self.data_seed is None:  # also a run saved before data_seed existed: same batches
            object.__setattr__(self, "data_seed", self.seed)
        _check_choice("penalty", self.penalty, penalties.PENALTIES)
        _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        for key in ("width", "k", "steps", "batch_size", "log_every", "ckpt_every",
                    "keep_checkpoints", "dead_tokens"):
            value = getattr(self, key)
            _check(0 < value < 2**31, f"{key} must be > 0 and < 2^31, got {value}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check(not isinstance(value, float) or math.isfinite(value),
                   f"{f.name} must be finite, got {value}")
        for key in ("sparsity_coeff", "aux_coeff", "grad_clip", "lr"):
            _check(getattr(self, key) >= 0, f"{key} must be >= 0, got {getattr(self, key)}")
        # The JumpReLU STE divides by the bandwidth and takes log(threshold); a relu decoder
        # of norm 0 has no direction: all three must be strictly positive.
        for key in ("bandwidth", "threshold_init", "init_norm"):
            _check(getattr(self, key) > 0, f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("sparsity_warmup", "lr_warmup", "lr_decay", "beta1", "beta2"):
            _check(0 <= getattr(self, key) <= 1, f"{key} must be in [0, 1]")
        _check(0 < self.holdout < 1, f"holdout must be in (0, 1), got {self.holdout}")
        _check(self.lr_warmup + self.lr_decay <= 1, "lr_warmup + lr_decay must be <= 1")
        _check(self.k <= self.width or self.arch not in TOPK_ARCHS,
               f"k={self.k} must be <= width={self.width}")
        _check(self.aux_k is None or self.aux_k > 0, "aux_k must be > 0")
        _check(not self.skip_connection or self.transcoder is not False,
               "skip_connection=true needs a transcoder (a store of input/target pairs)")
        if self.matryoshka_widths is not None:
            object.__setattr__(self, "matryoshka_widths", tuple(self.matryoshka_widths))
        _check_choice("crosscoder_norm", self.crosscoder_norm, CROSSCODER_NORMS)
        if self.sources is not None:
            object.__setattr__(self, "sources", tuple(int(d) for d in self.sources))
            _check(arch.crosscoder, f"sources is for the crosscoder and CLT architectures, "
                                    f"not arch={self.arch}")
            _check(len(self.sources) > 0 and all(d > 0 for d in self.sources),
                   f"sources must be positive widths, got {self.sources}")
        if arch.check:
            arch.check(self)
        _check(self.penalty != "l0" or "log_threshold" in arch.extra_axes,
               "penalty=l0 needs the learned thresholds of arch=jumprelu (or clt_jumprelu)")
        from sae_jax.mesh import parse_mesh  # validates the syntax; sizes are checked later

        parse_mesh(self.mesh, n_devices=None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_devices(self, devices: list, d_in: int) -> TrainConfig:
        """Resolves the device-dependent defaults (`compute_dtype=auto`, an empty `mesh`).

        Done at train time, not at parse time, because asking JAX about devices starts its
        backend, which must wait for `jax.distributed.initialize` on multi-host runs.
        """
        from sae_jax.mesh import auto_mesh_spec, device_memory_bytes

        updates = {}
        if self.compute_dtype == "auto":
            updates["compute_dtype"] = "bfloat16" if devices[0].platform == "tpu" else "float32"
        if not self.mesh:
            updates["mesh"] = auto_mesh_spec(len(devices), d_in, self.width,
                                             device_memory_bytes(devices[0]))
        return dataclasses.replace(self, **updates)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_choice(key: str, value: Any, choices) -> None:
    _check(value in choices, f"bad value for {key}: {value!r}; choose one of: {', '.join(choices)}")


def field_docs() -> dict[str, str]:
    """Field name -> its docstring, read from this module's source (one place for docs)."""
    source = inspect.getsource(TrainConfig)
    body = ast.parse(source).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = nxt.value.value
    return docs


def describe() -> str:
    """A Markdown table of every config key, its default and meaning (docs/training.md)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, doc in field_docs().items():
        default = "derived" if defaults[name] is None else f"`{defaults[name]!r}`"
        rows.append(f"| `{name}` | {default} | {' '.join(doc.split())} |")
    return "\n".join(rows)


def _parse_value(key: str, raw: str, hints: Any = None) -> Any:
    """Converts the text of one `key=value` to the field's type, or raises a one-line error.

    Booleans are true/false/1/0; tuples are comma-separated (`matryoshka_widths=192,768`)."""
    hints = typing.get_type_hints(TrainConfig)[key] if hints is None else hints
    options = typing.get_args(hints) if isinstance(hints, types.UnionType) else (hints,)
    if type(None) in options and raw.lower() in ("none", "null", ""):
        return None
    base = next(t for t in options if t is not type(None))
    try:
        if base is bool:
            return {"true": True, "1": True, "false": False, "0": False}[raw.lower()]
        if typing.get_origin(base) is tuple:
            return tuple(_parse_value(key, v, int) for v in raw.split(","))
        if base is int:
            value = float(raw)
            if not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            return float(raw)
        return raw
    except (ValueError, KeyError):
        expected = getattr(base, "__name__", str(base))
        raise UserError(f"bad value for {key}: {raw!r} (expected {expected})") from None


def split_pair(pair: str) -> tuple[str, str]:
    """`"key=value"` -> `("key", "value")`, stripped: the one `key=value` grammar of the
    command line (config keys, sweep lists, bench keys)."""
    key, sep, value = pair.partition("=")
    if not sep:
        raise UserError(f"expected key=value, got {pair!r}")
    return key.strip(), value.strip()


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parses `key=value` strings into typed overrides, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    overrides = {}
    for pair in pairs:
        key, raw = split_pair(pair)
        if key not in fields:
            raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(fields)}")
        overrides[key] = _parse_value(key, raw)
    return overrides


def make_config(pairs: list[str] | None = None, **overrides: Any) -> TrainConfig:
    """Builds a validated config from `key=value` strings and/or keyword overrides."""
    values = parse_overrides(pairs or [])
    values.update(overrides)
    return TrainConfig(**values)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuilds a saved config (as written by `to_dict`), rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown config keys in saved config: {', '.join(unknown)}")
    return TrainConfig(**values)
