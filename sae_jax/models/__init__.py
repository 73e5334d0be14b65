"""The old home of the language models, kept so `sae_jax.models.minilm` imports still work.

The models live in `sae_jax.lm` now.
"""
