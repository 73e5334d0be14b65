"""Opening a trained run to analyse it on the model it was harvested from.

`steer`, `features` and `audit` all start the same way: read the run, find its store, check
that the store is a model harvest (not pairs) at the layer asked for, then load the SAE and
the model. `open_model_run` does that once, with one clear line for each way it can fail, and
hands back a `ModelRun`. `features` and `audit` read MiniLM's sentence embeddings, so they
take MiniLM stores only; `steer` (`causal=True`) also takes a causal-LM harvest, whose model
is reloaded from the folder the store names (`lm.hooks.store_model`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sae_jax.errors import UserError
from sae_jax.lm.hooks import (
    MODEL_NAME,
    check_model_store,
    check_not_transcoder,
    is_causal,
    store_model,
)
from sae_jax.sae import SAE

if TYPE_CHECKING:  # only for the annotations: opening a run loads these lazily
    from sae_jax.data.store import Store
    from sae_jax.lm.causal import CausalLM
    from sae_jax.lm.minilm import MiniLM


@dataclass(frozen=True)
class ModelRun:
    """A trained SAE with its store and the model it reads.

    Attributes:
      run_dir: the run directory, as given.
      sae: the loaded SAE.
      store: the opened store (the run's training store unless another was given).
      layer: the block the SAE reads (the store's `layer`).
      keep_special: the store also holds special-token rows (`[CLS]`/`[SEP]`, or BOS).
      model: all-MiniLM-L6-v2 (`lm.minilm.MiniLM`), or the store's causal LM
        (`lm.causal.CausalLM`) for a causal harvest.
      site: where in block `layer` the SAE reads ("resid", "attn_out", "mlp_out"; MiniLM
        stores hold the residual stream).
    """

    run_dir: str
    sae: SAE
    store: Store
    layer: int
    keep_special: bool
    model: MiniLM | CausalLM
    site: str = "resid"

    @property
    def causal(self) -> bool:
        """The store is a causal-LM harvest (the model generates text)."""
        return is_causal(self.store.meta)


def open_model_run(run_dir: str | os.PathLike, command: str, *, layer: int | None = None,
                   data_dir: str | os.PathLike | None = None, hint: str = "",
                   causal: bool = False) -> ModelRun:
    """Opens `run_dir` for `command` (named in the errors), checking its store first.

    Args:
      layer: the layer the user asked for (`--layer`); it must be the store's.
      data_dir: a store to use instead of the run's training store.
      hint: what to do instead when the store is not a model harvest (ends that error).
      causal: `command` also runs on causal-LM harvests (else they are refused).

    Raises:
      UserError: no run; a transcoder; the store is not a MiniLM (or, with `causal`, a
        causal-LM) harvest, holds pairs, another width, or another layer than `layer`; the
        causal LM's folder no longer holds the model the store was harvested from.
    """
    from sae_jax.data.store import open_store
    from sae_jax.lm import minilm
    from sae_jax.rundir import read_run
    from sae_jax.sae import load

    info = read_run(run_dir)
    check_not_transcoder(info.config, command)
    store = open_store(info.data_dir if data_dir is None else data_dir)
    meta = store.meta
    if is_causal(meta) and not causal:
        raise UserError(f"{command} runs on {MODEL_NAME} stores only (it reads MiniLM's "
                        f"sentence embeddings); store {store.path} holds activations of the "
                        f"causal LM {meta.get('model')!r}")
    if meta.get("model") != MODEL_NAME and not is_causal(meta):
        raise UserError(f"{command} runs {MODEL_NAME}, but store {store.path} holds "
                        f"activations of {meta.get('model')!r}" + (f"; {hint}" if hint else ""))
    check_model_store(store, command)
    if meta.get("pair"):
        raise UserError(f"{command} needs an SAE on the residual stream; store {store.path} "
                        "holds transcoder pairs")
    if store.d_in != info.d_in:
        raise UserError(f"store {store.path} has d_in={store.d_in}, but the SAE in {run_dir} "
                        f"expects d_in={info.d_in}")
    trained = _training_layer(info, store)
    if layer is not None and layer != trained:
        raise UserError(f"--layer {layer} does not match the run: its SAE reads layer "
                        f"{trained} (store {store.path}); leave --layer out")
    model = store_model(meta) if is_causal(meta) else minilm.MiniLM.load()
    return ModelRun(str(run_dir), load(run_dir), store, trained,
                    bool(meta.get("keep_special", False)), model,
                    str(meta.get("site", "resid")))


def _training_layer(info, store) -> int:
    """The layer of `store`, which must be the layer the run was trained on (checked when
    the run's own training store, if it is another one, can still be opened)."""
    from sae_jax.data.store import open_store

    layer = int(store.meta["layer"])
    if str(store.path) != str(info.data_dir):
        try:
            trained = open_store(info.data_dir).meta.get("layer")
        except UserError:  # moved or deleted since training: nothing to check against
            trained = None
        if trained is not None and int(trained) != layer:
            raise UserError(f"store {store.path} holds layer {layer}, but the run was trained "
                            f"on layer {trained} ({info.data_dir})")
    return layer
