"""The release stage: turn an audited SAE into a release decision. `prune` makes a cheaper
SAE, `bundle` writes the auditable unit (SAE, catalog, reports, provenance, bill, manifest),
`verify` checks a bundle against its hashes and the model, and `gate` decides ship or not."""
