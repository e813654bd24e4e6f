"""Which failures are retried, and how long to wait: one tenacity policy for the sync and the async client.

Retried: 429 (the queue is full; wait at least the service's ``Retry-After``), 503 (not ready) and connection
failures (refused, reset, dropped before the answer). Every wait has jitter, so clients that were refused
together do not come back together. Not retried: any other status (an invalid or oversized request fails the
same way again) and read timeouts (the service may still be working on it; resending doubles its load).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from saft_filter_client.errors import Overloaded, SaftError, Unavailable

log = logging.getLogger("saft_filter_client")

#: Transport failures after which the request is safe to send again: it never reached the service, or the
#: connection broke before an answer (scoring is a pure function of the request, so a replay is harmless).
TRANSIENT_TRANSPORT: tuple[type[Exception], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (Overloaded, Unavailable, *TRANSIENT_TRANSPORT))


class wait_retry_after(wait_base):  # named as tenacity's own waits (wait_fixed, wait_random_exponential)
    """The service's ``Retry-After`` plus up to ``jitter_s`` of random extra; without one, ``fallback``."""

    def __init__(self, fallback: wait_base, jitter_s: float) -> None:
        self.fallback = fallback
        self.jitter_s = jitter_s

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        if isinstance(exc, SaftError) and exc.retry_after_s is not None:
            return exc.retry_after_s + random.uniform(0.0, self.jitter_s)
        return float(self.fallback(retry_state))


@dataclass(frozen=True)
class RetryPolicy:
    """How many times a request is tried in all, and the backoff between tries: full jitter, exponentially
    widening from ``backoff_s`` up to ``max_backoff_s``, or ``Retry-After`` plus up to ``jitter_s``."""

    attempts: int = 8
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    jitter_s: float = 1.0

    def _kwargs(self, what: str) -> dict[str, Any]:
        if self.attempts < 1:
            raise ValueError(f"attempts: must be at least 1, got {self.attempts}")

        def warn(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning("%s: %s; try %d of %d in %.2f s", what, exc, state.attempt_number + 1, self.attempts, wait)

        return {
            "retry": retry_if_exception(is_transient),
            "wait": wait_retry_after(wait_random_exponential(multiplier=self.backoff_s, max=self.max_backoff_s), self.jitter_s),
            "stop": stop_after_attempt(self.attempts),
            "before_sleep": warn,
            "reraise": True,  # the last SaftError or transport error itself, not tenacity's RetryError
        }

    def retrying(self, what: str) -> Retrying:
        """A fresh controller for one call (tenacity keeps per-call state on it); ``what`` names it in the log."""
        return Retrying(**self._kwargs(what))

    def async_retrying(self, what: str) -> AsyncRetrying:
        return AsyncRetrying(**self._kwargs(what))
