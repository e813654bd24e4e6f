"""Embeddings in a running service: each distinct input embedded once, through the cache, shared in flight, batched.

Owns: formatting and cache keys, the two cache tiers' lookups and writes, in-flight sharing between concurrent
requests (an input another request is embedding is awaited, not run twice), the cheap 429 before tokenizing, and
handing the rest to the micro-batcher, which it builds from the settings with its forward pass (the worker thread's only
model code) and its per-batch metrics. Must not: know HTTP, subspaces or verdicts (``ScoringService.score`` does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np

from app import metrics
from app.config import Settings
from app.core.embedding import Embedder, EmbeddingConfig, Encoded, cache_key
from app.core.items import Item
from app.serving.batching import BatchStats, MicroBatcher, QueueFull
from app.serving.cache import CachedEmbedding, EmbeddingCache

Batcher = MicroBatcher[tuple[Encoded, EmbeddingConfig], np.ndarray]


class SharedEmbeddings:
    """The service's embed path (see the module docstring); the batcher runs the forward passes."""

    def __init__(self, embedder: Embedder, cache: EmbeddingCache, settings: Settings) -> None:
        self.embedder = embedder
        self.cache = cache
        self.batcher: Batcher = MicroBatcher(
            self._forward,
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            on_batch=_export_batch,
            feeder_nice=settings.feeder_nice,
            max_padding=settings.max_batch_padding,
            max_queue_per_caller=settings.client_queue_share,
            overtake_tokens=settings.overtake_tokens if settings.fair_queuing else 0,
        )
        self.inflight: dict[str, asyncio.Future[CachedEmbedding | None]] = {}  # cache key → its embedding in progress

    def _forward(self, batch: Sequence[tuple[Encoded, EmbeddingConfig]]) -> list[np.ndarray]:
        """Runs in the batcher's worker thread: one forward pass for one embedding config (the batch key)."""
        config = batch[0][1]
        return list(self.embedder.forward([enc for enc, _ in batch], config, checkpoint=self.batcher.checkpoint))

    def _format_and_key(self, items: Sequence[Item], config: EmbeddingConfig) -> tuple[list[str], list[int | None], list[str]]:
        texts, response_chars = self.embedder.format_items(items, config)
        digest, path = self.embedder.weights_digest, self.embedder.numeric_path
        keys = [cache_key(digest, config, text, path) for text in texts]
        return texts, response_chars, keys

    async def embed(self, items: Sequence[Item], config: EmbeddingConfig, *, wait: bool = False,
                    caller: str | None = None) -> tuple[list[Encoded], np.ndarray]:
        """Embed items, each distinct input once: cached ones (local, then Redis) are not run again,
        duplicates within the call share one forward pass, and an input another request is already
        embedding is awaited rather than run twice; the rest wait for the shared inference worker.

        A full queue raises ``QueueFull`` — unless ``wait`` (streams that cannot answer 429 halfway):
        then the call stands in line for room, ahead of every later caller. ``caller`` (a client's identity)
        shares the inference worker fairly with other callers and holds at most its share of the queue."""
        texts, response_chars, keys = await asyncio.to_thread(self._format_and_key, items, config)
        cached, local_hits, redis_hits = await self.cache.get_many(keys)
        first: dict[str, int] = {}  # key → index of its first uncached occurrence
        for i, (key, entry) in enumerate(zip(keys, cached, strict=True)):
            if entry is None and key not in first:
                first[key] = i
        sharing = self.cache.enabled  # with the cache off, requests share nothing
        awaited = {key: self.inflight[key] for key in first if key in self.inflight} if sharing else {}
        own = [i for key, i in first.items() if key not in awaited]
        metrics.CACHE_HITS.labels("local").inc(local_hits)
        metrics.CACHE_HITS.labels("redis").inc(redis_hits)
        metrics.CACHE_HITS.labels("request").inc(len(items) - local_hits - redis_hits - len(first))
        metrics.CACHE_HITS.labels("inflight").inc(len(awaited))
        metrics.CACHE_MISSES.inc(len(own))
        embed_own = self._embed_owned if sharing else self._embed_uncached
        fresh = await embed_own(own, texts, response_chars, keys, config, wait, caller)
        if awaited:
            shared = await asyncio.gather(*(asyncio.shield(f) for f in awaited.values()))
            fresh.update((key, entry) for key, entry in zip(awaited, shared, strict=True) if entry is not None)
            abandoned = [first[key] for key in awaited if key not in fresh]  # their request failed or left: run them here
            metrics.CACHE_MISSES.inc(len(abandoned))
            fresh.update(await self._embed_uncached(abandoned, texts, response_chars, keys, config, wait, caller))
        entries = [entry if entry is not None else fresh[key] for key, entry in zip(keys, cached, strict=True)]
        out = [Encoded((), e.n_tokens, e.truncated) for e in entries]
        return out, np.stack([e.vector for e in entries]) if entries else np.empty((0, self.embedder.dim(config)), np.float32)

    async def _embed_owned(self, todo: list[int], texts: list[str], response_chars: list[int | None], keys: list[str],
                           config: EmbeddingConfig, wait: bool, caller: str | None = None) -> dict[str, CachedEmbedding]:
        """Embed items no other request is embedding, announcing each so concurrent duplicates wait for it.

        Waiters get None when this request fails or is cancelled, and then embed the item themselves."""
        loop = asyncio.get_running_loop()
        announced: dict[str, asyncio.Future[CachedEmbedding | None]] = {keys[i]: loop.create_future() for i in todo}
        self.inflight.update(announced)
        fresh: dict[str, CachedEmbedding] = {}
        try:
            fresh = await self._embed_uncached(todo, texts, response_chars, keys, config, wait, caller)
        finally:
            for key, future in announced.items():
                future.set_result(fresh.get(key))
                if self.inflight.get(key) is future:
                    del self.inflight[key]
        return fresh

    async def _embed_uncached(self, todo: list[int], texts: list[str], response_chars: list[int | None], keys: list[str],
                              config: EmbeddingConfig, wait: bool, caller: str | None = None) -> dict[str, CachedEmbedding]:
        """Tokenize and run items through the batcher, then cache them."""
        if not todo:
            return {}
        start = time.perf_counter()
        if not wait:
            try:
                self.batcher.check_room(len(todo), caller)  # an overloaded queue refuses before tokenizing (a cheap 429)
            except QueueFull:
                metrics.QUEUE_FULL.inc()
                raise
        encoded = await asyncio.to_thread(self.embedder.encode, [texts[i] for i in todo], config, [response_chars[i] for i in todo])
        metrics.TOKENIZE_SECONDS.observe(time.perf_counter() - start)
        try:
            rows = await self.batcher.submit([(e, config) for e in encoded], [len(e.input_ids) for e in encoded], key=config, wait=wait,
                                             caller=caller)
        except QueueFull:
            metrics.QUEUE_FULL.inc()
            raise
        finally:
            metrics.QUEUE_DEPTH.set(self.batcher.queue_depth)
        fresh = {keys[i]: CachedEmbedding(row, e.n_tokens, e.truncated) for i, e, row in zip(todo, encoded, rows, strict=True)}
        await self.cache.put_many(fresh)
        return fresh


def _export_batch(stats: BatchStats) -> None:
    """The batcher's per-batch statistics as metrics (size, tokens, the padding share, seconds, queue depth)."""
    metrics.BATCH_SIZE.observe(stats.size)
    metrics.BATCH_TOKENS.observe(stats.padded_tokens)
    if stats.padded_tokens:
        metrics.BATCH_PADDING.observe(1 - stats.real_tokens / stats.padded_tokens)
    metrics.PADDING_TOKENS.inc(stats.padded_tokens - stats.real_tokens)
    metrics.REAL_TOKENS.inc(stats.real_tokens)
    metrics.INFERENCE_SECONDS.observe(stats.seconds)
    metrics.QUEUE_DEPTH.set(stats.queue_depth)
