"""Where subspace versions live: artifact files on disk, the registry's active snapshot, and the fleet's shared state
in Redis.

Owns: reading, writing (atomically), listing and activating versions, locally and across replicas.
Must not: know HTTP, the micro-batcher or the service facade (``app.serving``); it builds on ``app.core`` only.
"""
