"""Embedding cache: identical inputs are embedded once, then scored under any later subspace version.

What is cached is the pooled embedding f(x) (float32) with the item's token count and truncation
flag — not the score. Scoring a cached vector is one projection, so a refit or rollback that keeps
the embedding config (model weights, layers, pooling, template, max length, truncation side) still
hits the cache; a config change changes the key, so stale vectors can never be used.

Two tiers: an in-process LRU with a TTL, bounded in bytes (``SAFT_CACHE_MAX_BYTES``), and, in a
fleet, Redis shared by every replica (entries expire after ``SAFT_CACHE_TTL_S``; Redis bounds its
memory with ``maxmemory`` + ``volatile-lru``, which evicts only keys with a TTL — cache entries,
never the registry). A Redis failure is a miss, never an error.

Owns: ``CachedEmbedding`` (its bytes) and ``EmbeddingCache`` (both tiers, the local byte bound). Must not: compute
keys, embed or score (``app.serving.embeddings`` keys entries by ``app.core.embedding.cache_key``), cache scores, or
fail a request on a Redis error; it imports nothing from ``app``.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import redis.asyncio as aioredis
from cachetools import TTLCache
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<I?")  # n_tokens, truncated
_ENTRY_OVERHEAD = 200  # bytes of Python object overhead per entry, counted against the bound


@dataclass(frozen=True, slots=True)
class CachedEmbedding:
    vector: np.ndarray  # float32, (dim,)
    n_tokens: int
    truncated: bool

    def to_bytes(self) -> bytes:
        return _HEADER.pack(self.n_tokens, self.truncated) + self.vector.astype(np.float32).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedEmbedding:
        n_tokens, truncated = _HEADER.unpack_from(data)
        return cls(np.frombuffer(data, np.float32, offset=_HEADER.size).copy(), n_tokens, truncated)


class EmbeddingCache:
    """Local LRU+TTL tier, optionally backed by a shared Redis tier."""

    def __init__(self, max_bytes: int, ttl_s: int, *, redis: aioredis.Redis | None = None, prefix: str = "saft") -> None:
        self.enabled = max_bytes > 0
        self._local: TTLCache[str, CachedEmbedding] = TTLCache(
            maxsize=max(max_bytes, 1), ttl=ttl_s, getsizeof=lambda e: e.vector.nbytes + _ENTRY_OVERHEAD
        )
        self._lock = threading.Lock()
        self._redis = redis
        self._ttl_s = ttl_s
        self._prefix = f"{prefix}:emb:"
        self.redis_online = redis is not None

    async def get_many(self, keys: Sequence[str]) -> tuple[list[CachedEmbedding | None], int, int]:
        """Entries per key (None = miss), and how many came from the local and the Redis tier."""
        if not self.enabled:
            return [None] * len(keys), 0, 0
        with self._lock:
            found: list[CachedEmbedding | None] = [self._local.get(k) for k in keys]
        local_hits = sum(e is not None for e in found)
        missing = [i for i, e in enumerate(found) if e is None]
        redis_hits = 0
        if missing and self._redis is not None and self.redis_online:
            try:
                raw = await self._redis.mget([self._prefix + keys[i] for i in missing])
            except (RedisError, OSError) as err:
                log.debug("cache: Redis read failed (%s); treated as misses", err)
                raw = [None] * len(missing)
            with self._lock:
                for i, data in zip(missing, raw, strict=True):
                    if data is not None:
                        # bytes: the client is built without decode_responses (app.store.fleet)
                        entry = CachedEmbedding.from_bytes(cast(bytes, data))
                        found[i] = entry
                        self._local[keys[i]] = entry
                        redis_hits += 1
        return found, local_hits, redis_hits

    async def put_many(self, entries: dict[str, CachedEmbedding]) -> None:
        if not self.enabled or not entries:
            return
        with self._lock:
            for key, entry in entries.items():
                self._local[key] = entry
        if self._redis is not None and self.redis_online:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, entry in entries.items():
                        pipe.set(self._prefix + key, entry.to_bytes(), ex=self._ttl_s)
                    await pipe.execute()
            except (RedisError, OSError) as err:
                log.debug("cache: Redis write failed (%s); kept locally", err)

    @property
    def local_bytes(self) -> int:
        with self._lock:
            return int(self._local.currsize)
