"""Per-client rate limits (requests and items per second): token buckets, in-process, per replica.

Owns: one bucket pair per client identity, refilled continuously at the configured rates with a burst of
``burst_s`` seconds' worth, and the ``RateLimited`` error (a 429 with Retry-After through the one error table,
as ``QueueFull``). Must not: know routes, models or the batcher's queue (admission to the queue, and the fair
order between callers, are the batcher's); both rates 0 means no limit at all.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.serving.batching import QueueFull

#: Buckets kept at most; idle, full ones are pruned first (a client that comes back starts full anyway).
_MAX_CLIENTS = 10_000


class RateLimited(QueueFull):
    """This client is over its rate; ``retry_after_s`` says when its bucket holds enough again."""


@dataclass
class _Bucket:
    requests: float
    items: float
    at: float


class RateLimiter:
    """``take(client, items)`` spends one request and ``items`` items of the client's buckets, or raises."""

    def __init__(self, requests_per_s: float, items_per_s: float, burst_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.requests_per_s = requests_per_s
        self.items_per_s = items_per_s
        self.burst_s = burst_s
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.requests_per_s > 0 or self.items_per_s > 0

    def _capacity(self, rate: float) -> float:
        return max(1.0, rate * self.burst_s)

    def take(self, client: str, items: int = 0) -> None:
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                if len(self._buckets) >= _MAX_CLIENTS:
                    self._prune(now)
                bucket = self._buckets[client] = _Bucket(self._capacity(self.requests_per_s), self._capacity(self.items_per_s), now)
            elapsed = now - bucket.at
            bucket.at = now
            bucket.requests = min(self._capacity(self.requests_per_s), bucket.requests + elapsed * self.requests_per_s)
            bucket.items = min(self._capacity(self.items_per_s), bucket.items + elapsed * self.items_per_s)
            waits = []
            if self.requests_per_s > 0 and bucket.requests < 1:
                waits.append(((1 - bucket.requests) / self.requests_per_s, f"{self.requests_per_s:g} requests/s"))
            if self.items_per_s > 0 and items > self._capacity(self.items_per_s):
                raise RateLimited(f"items: {items} items exceed this client's burst of {self._capacity(self.items_per_s):.0f} "
                                  f"({self.items_per_s:g} items/s × {self.burst_s:g} s); split the request", _retry(self.burst_s))
            if self.items_per_s > 0 and bucket.items < items:
                waits.append(((items - bucket.items) / self.items_per_s, f"{self.items_per_s:g} items/s"))
            if waits:
                wait, what = max(waits)
                raise RateLimited(f"rate limit: this client is over {what} (SAFT_RATE_LIMIT_*); retry in {_retry(wait):.0f} s",
                                  _retry(wait))
            if self.requests_per_s > 0:
                bucket.requests -= 1
            if self.items_per_s > 0:
                bucket.items -= items

    def _prune(self, now: float) -> None:
        """Forget the buckets that have refilled (they would start full again anyway)."""
        full = [c for c, b in self._buckets.items() if now - b.at >= self.burst_s]
        for client in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[client]


def _retry(seconds: float) -> float:
    return float(max(1, math.ceil(seconds)))
