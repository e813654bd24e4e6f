"""Per-client rate limits: token buckets per identity, refilled with time, off when both rates are 0."""

from __future__ import annotations

import pytest

from app.serving.batching import QueueFull
from app.serving.ratelimit import RateLimited, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_second_bursts_then_refuses_that_client_only() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_s=2, items_per_s=0, burst_s=1.5, clock=clock)
    limiter.take("a")
    limiter.take("a")
    limiter.take("a")  # a burst of 2 × 1.5 = 3 requests
    with pytest.raises(RateLimited, match="over 2 requests/s") as info:
        limiter.take("a")
    assert isinstance(info.value, QueueFull) and info.value.retry_after_s == 1  # a 429 with Retry-After, as QueueFull
    limiter.take("b")  # another client has its own bucket
    clock.now += 0.5  # one request's worth refilled
    limiter.take("a")
    with pytest.raises(RateLimited):
        limiter.take("a")


def test_items_per_second_counts_items_and_refuses_what_no_wait_could_admit() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_s=0, items_per_s=10, burst_s=2, clock=clock)
    limiter.take("a", 15)
    with pytest.raises(RateLimited, match="over 10 items/s") as info:
        limiter.take("a", 10)
    assert info.value.retry_after_s == 1  # 5 left, 5 more in 0.5 s
    with pytest.raises(RateLimited, match="exceed this client's burst of 20"):
        limiter.take("b", 21)
    clock.now += 1.0
    limiter.take("a", 10)


def test_no_rates_no_limit() -> None:
    limiter = RateLimiter(0, 0, 1)
    assert not limiter.enabled
    for _ in range(1000):
        limiter.take("a", 10_000)
