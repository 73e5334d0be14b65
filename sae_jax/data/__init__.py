"""Activation stores, the training loader, importers and synthetic data."""
