"""The run directory's record of what was trained on what (`config.json`), and the data
statistics a new run starts from.

`config.json` holds the training config plus what was derived from the data (`d_in`, the
input scale that makes E‖x‖² = d_in: one number, or on a multi-source store one per source,
saved per column as a list; see `sae_jax.scales`). Re-running `train` on the same directory
resumes, so a changed config is checked here: keys that change the math must match the saved
run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from sae_jax import files, saes, scales
from sae_jax.config import TrainConfig, config_from_dict
from sae_jax.data.loader import stats_sample
from sae_jax.errors import UserError
from sae_jax.scales import Scale

CONFIG_FILE = "config.json"
IMPORTED_FROM = "imported_from.json"
"""Written by `sae-jax import-saelens`: the run's params were not trained here."""
PRUNED_FROM = "pruned_from.json"
"""Written by `sae-jax prune`: the run's latents are a renumbered subset of another run's."""
RESUMABLE_KEYS = ("steps", "log_every", "ckpt_every", "keep_checkpoints", "mesh")
"""Keys that may differ when a run is resumed: they change bookkeeping, not the math."""


@dataclass(frozen=True)
class RunInfo:
    """What a run was trained on. A transcoder also has the target's width and scale."""

    config: TrainConfig
    d_in: int
    input_scale: Scale
    data_dir: str
    d_out: int | None = None
    target_scale: Scale | None = None
    store_id: str | None = None
    """The id of the store it was trained on (None for runs and stores that predate ids)."""

    def scaled_mean(self, stats: DataStats) -> np.ndarray:
        """The mean of what the SAE reconstructs (the input, or a transcoder's target), in
        this run's scaled units: where a fresh decoder bias starts."""
        if self.d_out is None:
            return (stats.input_mean * scales.multiplier(self.input_scale)).astype(np.float32)
        return (stats.target_mean * scales.multiplier(self.target_scale)).astype(np.float32)

    def to_dict(self) -> dict:
        out = {"config": self.config.to_dict(), "d_in": self.d_in,
               "input_scale": scales.to_json(self.input_scale), "data_dir": self.data_dir}
        if self.d_out is not None:
            out.update(d_out=self.d_out, target_scale=scales.to_json(self.target_scale))
        if self.store_id is not None:
            out["store_id"] = self.store_id
        return out


@dataclass(frozen=True)
class DataStats:
    """One read of the stats sample: the input scale c (E‖c·x‖² = d, or per source) and the
    raw mean of the input, and a transcoder's target scale and mean."""

    input_scale: Scale
    input_mean: np.ndarray
    target_scale: Scale | None = None
    target_mean: np.ndarray | None = None


def read_data_stats(train_rows, d_in: int, d_out: int | None = None) -> DataStats:
    """Reads evenly spread blocks of the training rows once (`loader.stats_sample`) and
    derives the scale and mean of the input, and of a transcoder's target (`d_out`): one
    scale per source where the store has several on that side (`scales.per_source`)."""
    sample = stats_sample(train_rows)
    sources = getattr(getattr(train_rows, "store", None), "sources", None)
    widths = scales.split_widths(sources and [int(s["d"]) for s in sources], d_in, d_out)
    halves = [sample[:, :d_in]] + ([sample[:, d_in:]] if d_out is not None else [])
    stats = []
    for half, side in zip(halves, widths):
        stats += [scales.per_source(half, side), half.mean(0)]
    return DataStats(*stats)


def data_widths(cfg: TrainConfig, store) -> tuple[TrainConfig, int, int | None]:
    """Resolves `transcoder` (and a crosscoder's `sources`) against the store: `(cfg, d_in,
    d_out)`, where `d_out` is the target's width for a transcoder and None for an SAE (which
    reconstructs its input)."""
    import dataclasses

    pair = store.pair
    transcoder = pair is not None if cfg.transcoder is None else cfg.transcoder
    if transcoder and pair is None:
        raise UserError(f"transcoder=true needs a store of input/target pairs, and "
                        f"{store.path} holds plain rows; harvest one with "
                        "`sae-jax harvest DATA_DIR --pair mlp`")
    if not transcoder and pair is not None:
        raise UserError(f"store {store.path} holds transcoder pairs (input + target); train a "
                        "transcoder (leave transcoder unset) or harvest the input alone")
    cfg = dataclasses.replace(cfg, transcoder=transcoder)
    if saes.get(cfg).crosscoder:
        cfg = dataclasses.replace(cfg, sources=_source_widths(cfg, store, transcoder))
    return (cfg, *pair) if transcoder else (cfg, store.d_in, None)


def _source_widths(cfg: TrainConfig, store, transcoder: bool) -> tuple[int, ...]:
    """A crosscoder's (or CLT's) source widths: `cfg.sources` if given (it must agree with
    the store's own), else the store's, else one source of the whole row (a pair store's
    input and target: a CLT of one layer)."""
    stored = store.sources
    stored = None if stored is None else tuple(int(s["d"]) for s in stored)
    widths = cfg.sources or stored or (store.pair if transcoder else (store.d_in,))
    if stored is not None and widths != stored:
        raise UserError(f"sources={','.join(map(str, widths))} disagrees with store "
                        f"{store.path}, whose sources are {','.join(map(str, stored))}; "
                        "leave sources unset")
    if sum(widths) != store.d_in:
        raise UserError(f"sources={','.join(map(str, widths))} add up to {sum(widths)}, but "
                        f"store {store.path} has rows of width {store.d_in}")
    return widths


def read_run(run_dir: str | Path) -> RunInfo:
    """Reads `run_dir/config.json`, with one-line errors for a missing or damaged file."""
    path = files.join(run_dir, CONFIG_FILE)
    text = files.read_text(path)
    if text is None:
        raise UserError(f"no run at {run_dir} (missing {CONFIG_FILE}); train one with "
                        "`sae-jax train DATA_DIR RUN_DIR`")
    try:
        raw = json.loads(text)
        d_out = raw.get("d_out")
        store_id = raw.get("store_id")
        d_in = int(raw["d_in"])
        d_out = None if d_out is None else int(d_out)
        input_scale = scales.from_json(raw["input_scale"], "input_scale", d_in)
        target_scale = (None if d_out is None else
                        scales.from_json(raw["target_scale"], "target_scale", d_out))
        return RunInfo(config_from_dict(raw["config"]), d_in, input_scale,
                       str(raw["data_dir"]), d_out, target_scale,
                       None if store_id is None else str(store_id))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is damaged: {type(e).__name__}: {e}") from None


def prepare_run(run_dir: str | Path, cfg: TrainConfig, store, stats: Callable[[], DataStats],
                widths: tuple[int, int | None] | None = None,
                has_checkpoints: bool = True) -> RunInfo:
    """Creates the run record, or checks a resumed run against it.

    Args:
      stats: the data statistics (read on first call); only called for a new run, so a
        resumed run keeps exactly the scales it had.
      widths: `(d_in, d_out)` from `data_widths` (default: the store's rows, no target).
      has_checkpoints: False when the run directory holds no checkpoint at all: then a
        record left by a run that failed before its first save is replaced, not enforced
        (there is nothing to resume, so nothing to protect).
    """
    d_in, d_out = widths or (store.d_in, None)
    if has_checkpoints and files.exists(files.join(run_dir, CONFIG_FILE)):
        saved = read_run(run_dir)
        if (d_in, d_out) != (saved.d_in, saved.d_out):
            what = f"d_in={d_in}" + ("" if d_out is None else f", d_out={d_out}")
            was = f"d_in={saved.d_in}" + ("" if saved.d_out is None else f", d_out={saved.d_out}")
            raise UserError(f"store {store.path} has {what}, but run {run_dir} "
                            f"was trained on {was}")
        old, new = saved.config.to_dict(), cfg.to_dict()
        changed = [k for k in old if k not in RESUMABLE_KEYS and old[k] != new[k]]
        if changed:
            details = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
            raise UserError(f"{run_dir} holds a run with a different config ({details}); "
                            "use a new RUN_DIR or the saved values")
        if saved.store_id is not None and store.id is not None and saved.store_id != store.id:
            raise UserError(f"run {run_dir} was trained on store {saved.store_id} "
                            f"({saved.data_dir}), but {store.path} is store {store.id}: a "
                            "different store of the same width; resume on the same store, or "
                            "use a new RUN_DIR")
        info = RunInfo(cfg, saved.d_in, saved.input_scale, saved.data_dir, saved.d_out,
                       saved.target_scale, saved.store_id)
    else:
        data_dir = store.path
        if not files.is_remote(data_dir):
            data_dir = str(Path(data_dir).absolute())
        s = stats()
        info = RunInfo(cfg, d_in, s.input_scale, data_dir, d_out, s.target_scale, store.id)
    if jax.process_index() == 0:
        write_run(run_dir, info)
    return info


def write_run(run_dir, info: RunInfo) -> None:
    """Writes `run_dir/config.json` (atomically: a resumed run never sees half a file)."""
    files.write_text(files.join(run_dir, CONFIG_FILE), json.dumps(info.to_dict(), indent=2) + "\n")
