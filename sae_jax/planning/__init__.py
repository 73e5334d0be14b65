"""Before and around a run: cost, scaling-law fits and the benchmark."""
