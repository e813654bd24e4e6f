"""The running service without HTTP: the micro-batcher, the embedding cache, rate limits, the process's heap, and
``ScoringService``, the one facade the HTTP layer calls.

Owns: lifecycle, admission, batching, caching and refit jobs of a running server.
Must not: know routes, request parsing or status codes (``app.api``); the batcher knows neither models nor routes.
"""
