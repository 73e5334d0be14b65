"""Kept for `from sae_jax.models import minilm` / `sae_jax.models.minilm.MiniLM.load()`:
MiniLM lives in `sae_jax.lm.minilm`."""

from sae_jax.lm.minilm import *  # noqa: F401,F403
from sae_jax.lm.minilm import MiniLM  # noqa: F401
