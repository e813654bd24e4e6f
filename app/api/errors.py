"""The one error table (as TEI's): exception → status code, with a message a client can act on.

Unexpected errors return a generic 500 body; the detail goes to the log, never to the client.

Owns: ``TABLE``, the HTTP layer's own exceptions (413, 408, 415, 404, 401, 403), the error body and its headers
(Retry-After, WWW-Authenticate), and the handlers ``install`` adds. Must not: map a status anywhere else, or put an
unexpected error's message in a response; the layers below raise their own exceptions and never a status code.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from starlette.exceptions import HTTPException

from app.core.embedding import EmbeddingError, ModelFault
from app.core.items import ItemError
from app.core.manifest import ArtifactError
from app.core.pipeline import validation_message
from app.core.quality import ThresholdError
from app.core.subspace import FitError
from app.serving.batching import BatcherClosed, QueueFull
from app.serving.errors import ItemTooLarge, ModelNotServed, NotReady, RefitInProgress
from app.serving.ratelimit import RateLimited
from app.store.artifacts import CorruptVersion, StoreWriteError

log = logging.getLogger(__name__)


class PayloadTooLarge(ValueError):
    """A body, upload, item count or item above its configured limit."""


class BodyTimeout(TimeoutError):
    """A request body that did not arrive in time (SAFT_BODY_READ_TIMEOUT_S): slow or stalled client."""


class UnsupportedEncoding(ValueError):
    """A request body in a Content-Encoding the route does not read."""


class NotFound(LookupError):
    """A job or version that does not exist."""


class Unauthorized(PermissionError):
    """No or unknown bearer token."""


class Forbidden(PermissionError):
    """A valid token without the right (or admin writes disabled)."""


TABLE: list[tuple[type[BaseException], int, str]] = [
    (RateLimited, 429, "rate_limited"),
    (QueueFull, 429, "overloaded"),
    (PayloadTooLarge, 413, "too_large"),
    (BodyTimeout, 408, "timeout"),
    (UnsupportedEncoding, 415, "unsupported_media_type"),
    (ItemTooLarge, 413, "too_large"),
    (ItemError, 422, "invalid_input"),
    (FitError, 422, "invalid_input"),
    (ThresholdError, 422, "invalid_input"),
    (ModelNotServed, 422, "invalid_input"),
    (NotReady, 503, "not_ready"),
    (BatcherClosed, 503, "not_ready"),
    (RefitInProgress, 409, "refit_in_progress"),
    (NotFound, 404, "not_found"),
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    # Server faults before the input faults they subclass: the store or the model failed, not the request.
    (StoreWriteError, 507, "storage_error"),
    (CorruptVersion, 500, "storage_error"),
    (ModelFault, 424, "model_error"),
    (ArtifactError, 422, "invalid_input"),
    (EmbeddingError, 422, "invalid_input"),
]


def status_of(exc: BaseException) -> tuple[int, str]:
    for exc_type, status, kind in TABLE:
        if isinstance(exc, exc_type):
            return status, kind
    return 500, "internal"


def error_response(exc: BaseException) -> ORJSONResponse:
    status, kind = status_of(exc)
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if isinstance(exc, BatcherClosed):
        headers["Retry-After"] = "1"  # stopping: another replica (or this one, restarted) takes the retry
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    message = str(exc) if status != 500 else "internal error"
    return ORJSONResponse({"error": message, "type": kind}, status_code=status, headers=headers)


def _http_error(exc: HTTPException) -> ORJSONResponse:
    """Starlette's own errors (unknown route, wrong method, unparsable body) in this table's shape."""
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI turns anything but a JSONDecodeError while parsing the body (invalid UTF-8, nesting past
        # the recursion limit, an integer too long to convert) into a bare 400: it is invalid input.
        cause = exc.__cause__
        return ORJSONResponse({"error": f"body: not valid JSON ({type(cause).__name__}: {cause})"[:500], "type": "invalid_input"},
                              status_code=422)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_input")
    return ORJSONResponse({"error": str(exc.detail), "type": kind}, status_code=exc.status_code, headers=exc.headers)


def install(app: FastAPI) -> None:
    known = tuple(t for t, _, _ in TABLE)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> ORJSONResponse:
        return ORJSONResponse({"error": validation_message(exc.errors()), "type": "invalid_input"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> ORJSONResponse:
        return _http_error(exc)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> ORJSONResponse:
        if not isinstance(exc, known):
            log.exception("unhandled error on %s %s", request.method, request.url.path)
        elif status_of(exc)[0] >= 500 or status_of(exc)[0] == 424:  # a server fault: the operator needs the detail
            log.error("server fault on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_response(exc)

    for exc_type in known:
        app.add_exception_handler(exc_type, _any)  # type: ignore[arg-type]  # TABLE's types are all Exceptions
