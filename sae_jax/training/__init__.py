"""Sharded training: the step and loop, sweeps, checkpoints, metrics, multi-host."""
