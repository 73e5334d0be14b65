"""What a trained SAE does: eval, fidelity, catalog, dashboard, steering, audit, compare."""
