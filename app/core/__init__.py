"""The scoring core: items and input files, the model's embeddings, the subspace, its fit, thresholds, calibrated
probabilities, quality and the source-held-out evaluation, sweeps and reports.

Owns: everything that turns rows into verdicts and fits into versions, as plain functions and data.
Must not: know HTTP, queues, the registry, Redis or where versions are stored (``app.store``); import-linter's
layers contract (pyproject.toml) checks it.
"""
