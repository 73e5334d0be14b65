"""sae_jax: sparse autoencoders on language-model activations, in JAX.

`sae_jax.load(RUN_DIR)` returns a trained `SAE` whose `.encode` / `.decode` take raw
activations; `sae_jax.saes` holds the pure-function core (`init`, `encode`, `decode`,
`loss`) and `sae_jax.training.train` the sharded trainer.
"""

__version__ = "0.1.0"


def load(run_dir, step=None):
    """Loads a trained SAE from a run directory (see `sae_jax.sae.load`)."""
    from sae_jax.sae import load as _load

    return _load(run_dir, step)


__all__ = ["load", "__version__"]
