"""Language models in JAX, the text corpus, and harvesting their activations."""
