"""uvicorn's httptools protocol with the two bounds on slow clients that uvicorn lacks.

uvicorn times out idle keep-alive connections only after a response. A connection that opens and
sends nothing, or sends its request head a byte at a time (slow-loris), is held forever, and so is
one that keeps dripping a body the app has already answered (413, 408). Each holds a socket and a
file descriptor; enough of them starve the server. Body time limits live in the app's middleware
(``app.api.app.RequestContext``); this class bounds what the app never sees.

Owns: ``BoundedHttpToolsProtocol`` (the request-head timeout, closing a connection answered before its body was in)
and ``http_protocol``. Must not: know the app, its routes or the service, or bound request bodies (the middleware does).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import Settings

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Closes a connection whose request head is not in within ``head_timeout_s`` (408), and one
    whose response is complete while its request body is not (it can never be reused)."""

    head_timeout_s: float = 30.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn passes an asyncio.Transport (typed BaseTransport)
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self.transport.close()  # answered early (413, 408): the rest of the body is not worth waiting for

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            body = b'{"error":"request head: not received within %g s (SAFT_BODY_READ_TIMEOUT_S)","type":"timeout"}' % self.head_timeout_s
            self.transport.write(REQUEST_TIMEOUT % (len(body), body))
            self.transport.close()


def http_protocol(settings: Settings) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.run(http=...)``, bound to the settings' timeout."""
    return type("SaftHttpProtocol", (BoundedHttpToolsProtocol,), {"head_timeout_s": settings.body_read_timeout_s})
