"""The sweep grid grammar: which `key=value` lists make a sweep, and the members they expand to.

`width=1024,4096 k=16,32` (value lists, their product) or `sweep=FILE.json` (a JSON list of
override dicts, or an object of value lists) name the members of a one-pass sweep
(`training.sweep`). Only keys that never change which batches are read can vary; `seed`
can, because a sweep shares one `data_seed` (the batch order): `seed=0,1,2` trains three
initialisations on the same batches.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing

from sae_jax import files
from sae_jax.config import TrainConfig, make_config, parse_overrides, split_pair
from sae_jax.errors import UserError

SWEEP_KEY = "sweep"
"""`sweep=FILE.json` names a sweep file: a JSON list of override dicts (one per member),
or a JSON object of value lists (their product)."""

SWEEPABLE = ("arch", "width", "k", "penalty", "sparsity_coeff", "sparsity_warmup", "bandwidth",
             "threshold_init", "matryoshka_widths", "skip_connection", "aux_k", "aux_coeff",
             "dead_tokens", "init_norm", "lr", "lr_warmup", "lr_decay", "beta1", "beta2",
             "grad_clip", "compute_dtype", "seed", "crosscoder_norm")
"""Keys that may differ between members: they change the SAE or its optimizer, never the
batches (`seed` sets the initialisation; the sweep shares one `data_seed`)."""

SHARED_KEYS = ("steps", "batch_size", "data_seed", "holdout", "transcoder", "sources", "mesh",
               "log_every", "ckpt_every", "keep_checkpoints")
"""Keys every member of one pass shares, so they cannot be swept: the data order (`steps`,
`batch_size`, `data_seed`), which rows and columns train (`holdout`, `transcoder`, a
crosscoder's `sources`: the store's), the one mesh that runs the fused step, and the loop's
bookkeeping."""


def _comma_valued(key: str) -> bool:
    """Keys whose single value is written with commas (`mesh=data:2,model:4`,
    `matryoshka_widths=192,768`): on the command line they are never value lists."""
    hints = typing.get_type_hints(TrainConfig).get(key)
    options = typing.get_args(hints) if isinstance(hints, types.UnionType) else (hints,)
    return key == "mesh" or any(typing.get_origin(t) is tuple for t in options)


def is_sweep(pairs: list[str]) -> bool:
    """Whether `key=value` pairs ask for a sweep: a value list (`width=1024,4096`) or a
    sweep file (`sweep=FILE.json`). `mesh=data:2,model:4` is one value, not a list (so are
    tuple-valued keys such as `matryoshka_widths`, which only a sweep file can sweep)."""
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if sep and (key == SWEEP_KEY or ("," in value and not _comma_valued(key))):
            return True
    return False


def _check_sweepable(key: str, where: str) -> None:
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    if key not in known:
        raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(known)}")
    if key not in SWEEPABLE:
        raise UserError(f"{key} cannot be swept ({where}): every member of a one-pass sweep "
                        f"reads the same batches; sweepable keys: {', '.join(SWEEPABLE)}")


def _json_value(key: str, value) -> str:
    """A sweep-file value as `key=value` text: JSON null, booleans, numbers, strings, and
    lists of integers for tuple-valued keys."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, str)):
        return str(value)
    if (isinstance(value, list) and _comma_valued(key) and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return ",".join(map(str, value))
    raise UserError(f"sweep file: bad value for {key}: {value!r} (expected a number, a "
                    "string, true/false or null)")


def read_sweep_file(path: str) -> list[dict[str, str]]:
    """The members of a sweep file as `{key: value text}` dicts.

    The file is plain JSON: either a list of override dicts, one per member
    (`[{"width": 1024, "k": 16}, {"width": 4096, "k": 32}]`), or an object of value lists
    whose product is the grid (`{"width": [1024, 4096], "k": [16, 32]}`).
    """
    raw = files.read_json(path, f"sweep file {path} does not exist")
    if isinstance(raw, dict) and raw and all(isinstance(v, list) and v for v in raw.values()):
        raw = [dict(zip(raw, values)) for values in itertools.product(*raw.values())]
    if not (isinstance(raw, list) and raw and all(isinstance(m, dict) and m for m in raw)):
        raise UserError(f"sweep file {path} must hold a non-empty JSON list of override "
                        'objects, e.g. [{"width": 1024}, {"width": 4096}], or an object of '
                        'non-empty value lists, e.g. {"width": [1024, 4096]}')
    members = []
    for member in raw:
        for key in member:
            _check_sweepable(key, f"in {path}")
        members.append({k: _json_value(k, v) for k, v in member.items()})
    return members


def expand_grid(pairs: list[str]) -> list[list[str]]:
    """Expands `key=v1,v2 ...` pairs (and a `sweep=FILE` member list) into one list of
    single-valued `key=value` pairs per member.

    Shared pairs come first in every member, then the member's own. The grid is the
    product of the sweep file's members (if any) and of every value list, in the order
    given (the last key varies fastest). When members differ in `seed` and no `data_seed`
    is given, every member gets `data_seed=` the first member's seed (one batch order, as
    a one-pass sweep needs). Every member's config is validated here, so a bad value fails
    before any training.

    Raises:
      UserError: a list for a key outside `SWEEPABLE`, an empty or repeated value, a key
        given twice, or a member whose config is invalid.
    """
    shared: list[str] = []
    axes: list[list[tuple[str, str]]] = []
    seen: set[str] = set()
    file_members: list[dict[str, str]] = [{}]
    for pair in pairs:
        key, value = split_pair(pair)
        if key in seen:
            raise UserError(f"{key} is given twice")
        seen.add(key)
        if key == SWEEP_KEY:
            file_members = read_sweep_file(value)
            continue
        if "," not in value or _comma_valued(key):
            shared.append(f"{key}={value}")
            continue
        _check_sweepable(key, f"{key}={value}")
        values = [v.strip() for v in value.split(",")]
        if "" in values or len(set(values)) != len(values):
            raise UserError(f"bad value list {key}={value}: empty or repeated values")
        axes.append([(key, v) for v in values])
    clash = seen & {k for member in file_members for k in member}
    if clash:
        raise UserError(f"{', '.join(sorted(clash))} given both in the sweep file and as "
                        "key=value")
    grid = []
    for member in file_members:
        for combo in itertools.product(*axes):
            own = [f"{k}={v}" for k, v in member.items()] + [f"{k}={v}" for k, v in combo]
            grid.append(shared + own)
    seed_swept = any(k == "seed" for axis in axes for k, _ in axis) or any(
        "seed" in member for member in file_members)
    if seed_swept and "data_seed" not in seen:
        first = make_config(grid[0]).seed
        grid = [[*shared, f"data_seed={first}", *pairs[len(shared):]] for pairs in grid]
    for member_pairs in grid:
        make_config(member_pairs)
    return grid


def _name_value(value) -> str:
    """A typed value as it is written in a member name: as on the command line, with tuples
    joined by `_` (commas separate the keys of a name)."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "_".join(map(str, value))
    return str(value)


def run_names(grid: list[list[str]]) -> list[str]:
    """A directory name per member, from the keys whose values differ between members, in
    order of first appearance: e.g. `width=1024,k=16`.

    A grid of one member is named after its sweepable keys (or `run` if it has none).

    Raises:
      UserError: two members are the same config (e.g. `lr=1e-3,0.001`).
    """
    texts = [dict(split_pair(p) for p in pairs) for pairs in grid]
    parsed = [parse_overrides(pairs) for pairs in grid]
    keys = list(dict.fromkeys(k for member in texts for k in member))
    if len(grid) > 1:
        varying = [k for k in keys if len({m.get(k) for m in texts}) > 1]
    else:
        varying = [k for k in keys if k in SWEEPABLE]
    names = [",".join(f"{k}={_name_value(m.get(k))}" for k in varying) or "run"
             for m in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"the sweep lists the same member more than once: {duplicates[0]}")
    return names


def config_names(cfgs: list[TrainConfig]) -> list[str]:
    """Member names from the config fields that differ between `cfgs` (default names for
    `train_sweep` callers that build configs themselves)."""
    dicts = [c.to_dict() for c in cfgs]
    keys = [k for k in dicts[0] if len({repr(d[k]) for d in dicts}) > 1]
    return [",".join(f"{k}={_name_value(d[k])}" for k in keys) or f"member{i}"
            for i, d in enumerate(dicts)]
