"""What can go wrong talking to a saft-filter service: the exceptions, and ``ItemRefused``, the per-item result
that stands in for an item the service would not score.

The service answers every error as ``{"error": message, "type": kind}`` (one table: 429 overloaded, 413 too
large, 422 invalid input, 503 not ready, ...); ``SaftError`` carries that body as it came. This module reads
responses; it sends nothing and retries nothing (``saft_filter_client.retry`` decides what is retried).
"""

from __future__ import annotations

import email.utils
import time

import httpx
from pydantic import BaseModel, Field, ValidationError

from saft_filter_client.models import ErrorBody


class SaftError(Exception):
    """An error answer of the service: its HTTP status, its ``type`` (``overloaded``, ``too_large``,
    ``invalid_input``, ``not_ready``, ...) and its message, which names the field, the line or the limit."""

    def __init__(self, status_code: int, type: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status_code} {type}: {message}")
        self.status_code = status_code
        self.type = type
        self.message = message
        self.retry_after_s = retry_after_s

    @classmethod
    def from_response(cls, response: httpx.Response) -> SaftError:
        """The error a non-2xx response stands for, as the subclass its status is retried as."""
        try:
            body = ErrorBody.model_validate_json(response.content)
            kind, message = body.type, body.error
        except ValidationError:  # not our error shape (a proxy's page, an empty body): keep what came
            kind, message = "http_error", response.text[:500] or response.reason_phrase
        exc_type = {429: Overloaded, 503: Unavailable}.get(response.status_code, SaftError)
        return exc_type(response.status_code, kind, message, retry_after(response))


class Overloaded(SaftError):
    """429: the service's queue cannot take the request now; ``retry_after_s`` says when it expects room."""


class Unavailable(SaftError):
    """503: the service is not ready (starting, stopping, no active subspace)."""


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or ``None``."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ItemRefused(BaseModel):
    """An item the service would not score, in its place among the results: the rest of the run goes on.

    ``type`` is the service's (``too_large``, ``invalid_input``), or ``too_large`` for an item the client could
    not send at all (bigger than a whole request body may be).
    """

    index: int = Field(description="The item's position in the input.")
    id: str | int | None = Field(None, description="The item's id, if it had one.")
    status_code: int
    type: str
    error: str = Field(description="The service's reason, naming the limit (e.g. characters per item) or the key.")
