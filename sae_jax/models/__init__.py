"""Language models ported to pure JAX, so activations for SAE training come from the same stack.

`sae_jax.models.minilm` is all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) with a hook for
splicing an SAE reconstruction into its residual stream.
"""
