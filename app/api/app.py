"""The FastAPI application: lifespan (load → subspace → warm up → batcher → ready), middleware, routers.

Owns: ``create_app`` (routers and the error table installed), the lifespan that starts and stops the service, JSON
logging with the request id, and ``RequestContext``: request ids, the access log, per-route metrics and the body
size and time limits enforced before FastAPI parses anything. Must not: load the model, a subspace or Redis at import
(``ScoringService.load`` builds them in the lifespan), or hold a route or any scoring logic.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__, metrics
from app.api import errors, health, info, moderations, score, subspace
from app.api.errors import BodyTimeout, PayloadTooLarge
from app.config import Settings, get_settings
from app.serving.service import ScoringService

log = logging.getLogger("saft.access")
request_id: ContextVar[str] = ContextVar("request_id", default="-")
STREAMING_UPLOADS = ("/filter", "/subspace/refit")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, with the request id of the request being served."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                                "msg": record.getMessage(), "request_id": request_id.get()}
        data.update(getattr(record, "fields", {}))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data).decode()


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class ClientGone(Exception):
    """The client disconnected before its body was read: nothing to answer."""


async def read_body(receive: Receive, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused above ``limit`` bytes (413) or when not in within ``timeout_s`` (408).

    Read here, before any parsing, so a body too large or too slow never reaches FastAPI (which would
    call either a bare 400).
    """
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise BodyTimeout(f"body: not received within {timeout_s:g} s (SAFT_BODY_READ_TIMEOUT_S)") from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise PayloadTooLarge(f"body: more than the limit of {limit} bytes")
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """``receive`` for an app after ``read_body``: the body once, then the client's own (disconnect) messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def stall_bounded(receive: Receive, timeout_s: float) -> Receive:
    """``receive`` for a streamed upload: each chunk must come within ``timeout_s`` (408 otherwise).

    Only while the body is arriving: afterwards ``receive`` waits for a disconnect, which may take
    as long as the response does.
    """
    done = False

    async def bounded() -> Message:
        nonlocal done
        if done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout_s)
        except TimeoutError:
            done = True  # never wait on this body again
            raise BodyTimeout(f"body: upload stalled for {timeout_s:g} s (SAFT_BODY_READ_TIMEOUT_S)") from None
        done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return bounded


class RequestContext:
    """Request id, access log and per-route metrics; body size and time limits enforced before parsing."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        token = request_id.set(rid)
        path = scope["path"]
        streaming = path in STREAMING_UPLOADS
        limit = self.settings.max_upload_bytes if streaming else self.settings.max_body_bytes
        timeout_s = self.settings.body_read_timeout_s
        status = {"code": 500}
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > limit:
                await errors.error_response(PayloadTooLarge(f"body: {int(declared)} bytes exceed the limit of {limit} bytes"))(
                    scope, receive, send_with_id)
                return
            if streaming:  # read by the route itself, chunk by chunk, against the upload limit
                await self.app(scope, stall_bounded(receive, timeout_s), send_with_id)
                return
            try:
                body = await read_body(receive, limit, timeout_s)
            except (PayloadTooLarge, BodyTimeout) as err:
                await errors.error_response(err)(scope, receive, send_with_id)
                return
            except ClientGone:
                status["code"] = 499  # nginx's "client closed request", for the log and metrics only
                return
            await self.app(scope, replaying(body, receive), send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - start
            metrics.REQUESTS.labels(template, scope["method"], str(status["code"])).inc()
            metrics.REQUEST_SECONDS.labels(template, scope["method"]).observe(elapsed)
            log.info("request", extra={"fields": {"method": scope["method"], "path": path, "status": status["code"],
                                                  "ms": round(elapsed * 1000, 2)}})
            request_id.reset(token)


def create_app(settings: Settings | None = None, service: ScoringService | None = None) -> FastAPI:
    """Build the app; the model is loaded in the lifespan, not at import."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        svc = service or ScoringService.load(settings)
        app.state.service = svc
        await svc.start()
        logging.getLogger("saft").info("ready" if svc.ready else "started without an active subspace")
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="saft-filter",
        version=__version__,
        description="SAFT: score fine-tuning samples by their projection onto a harmful-content subspace of an LLM's "
        "hidden states, and drop those above τ.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(score.router)
    app.include_router(subspace.router)
    app.include_router(health.router)
    app.include_router(info.router)
    app.include_router(moderations.router)
    app.add_middleware(RequestContext, settings=settings)
    return app
