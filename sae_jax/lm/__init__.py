"""Language models in JAX, the text corpus, and harvesting their activations.

`load(path, dtype=None, mesh=None)` is the one entry point for a model: a local Hugging Face
folder of a supported causal LM (`sae_jax.lm.families.SUPPORTED`), or "minilm" for the
packaged all-MiniLM-L6-v2.
"""


def load(path, dtype=None, mesh=None):
    """A causal LM from a Hugging Face folder (`sae_jax.lm.causal.load`), or MiniLM for
    "minilm" (`sae_jax.lm.minilm.MiniLM`, which has `residual` but no LM head)."""
    if str(path) == "minilm":
        from sae_jax.lm.minilm import MiniLM

        return MiniLM.load()
    from sae_jax.lm.causal import load as load_causal

    return load_causal(path, dtype=dtype, mesh=mesh)
