"""Prometheus collectors, named once (``saft_..._total``, ``saft_..._seconds``), low-cardinality labels.

Owns: every collector of the process. Must not: import anything of ``app`` (the serving and HTTP layers import it;
the core must not, an import-linter contract), or take a label whose values are unbounded (text, ids, tokens).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("saft_requests_total", "HTTP requests by route and status.", ["route", "method", "status"])
REQUEST_SECONDS = Histogram(
    "saft_request_seconds", "HTTP request latency by route.", ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
QUEUE_DEPTH = Gauge("saft_queue_depth", "Items waiting for the inference worker.")
BATCH_SIZE = Histogram("saft_batch_size", "Items per forward pass.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_TOKENS = Histogram(
    "saft_batch_tokens", "Padded tokens per forward pass.", buckets=(64, 256, 512, 1024, 2048, 4096, 8192, 16384)
)
BATCH_PADDING = Histogram(
    "saft_batch_padding_ratio", "Share of a forward pass's padded tokens that are padding (on a CPU a padded token costs as much as a real one).",
    buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0),
)
PADDING_TOKENS = Counter("saft_padding_tokens_total", "Padding tokens run through the model (padded minus real).")
REAL_TOKENS = Counter("saft_real_tokens_total", "Real tokens run through the model.")
INFERENCE_SECONDS = Histogram(
    "saft_inference_seconds", "Forward-pass time per batch.", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
)
TOKENIZE_SECONDS = Histogram("saft_tokenize_seconds", "Formatting and tokenization time per request chunk.")
ITEMS_SCORED = Counter("saft_items_scored_total", "Items scored.")
VERDICTS = Counter("saft_verdicts_total", "Verdicts given.", ["verdict"])
TRUNCATIONS = Counter("saft_truncations_total", "Items cut to the maximum length.")
REJECTED_LINES = Counter("saft_rejected_lines_total", "Invalid /filter lines answered with an error record.")
QUEUE_FULL = Counter("saft_queue_full_total", "Requests answered 429 because the queue was full.")
RATE_LIMITED = Counter("saft_rate_limited_total", "Requests answered 429 because their client was over its rate limit.")
ACTIVE_VERSION = Gauge("saft_active_subspace_version", "Active subspace version number (vN → N).", ["name"])
REFITS = Counter("saft_refits_total", "Refit jobs by outcome.", ["outcome"])
CACHE_HITS = Counter("saft_cache_hits_total", "Items not embedded again: found locally, in Redis, earlier in the same request, or in flight for another request.", ["tier"])
CACHE_MISSES = Counter("saft_cache_misses_total", "Distinct items embedded by the model.")
FLEET_ONLINE = Gauge("saft_redis_connected", "1 while Redis (fleet state, shared cache) is reachable, 0 when degraded.")
HEAP_BYTES = Gauge("saft_heap_bytes", "glibc malloc's heap: in use, free but held (returned by malloc_trim), mmapped.", ["state"])
CACHE_BYTES = Gauge("saft_cache_bytes", "Bytes held by the in-process embedding cache (bounded by SAFT_CACHE_MAX_BYTES).")
HEAP_TRIMS = Counter("saft_heap_trims_total", "Times glibc's free heap pages were handed back to the OS (malloc_trim).")
