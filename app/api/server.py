"""The uvicorn server that ``saft serve`` runs: its HTTP protocol and the shutdown grace the service is told about.

Owns: building uvicorn's ``Config`` and ``Server`` for the app, and passing SIGTERM/SIGINT on to the service as soon
as uvicorn sees it (``ScoringService.begin_shutdown``), so that work which cannot start within
``SAFT_SHUTDOWN_GRACE_S`` is answered 503 + Retry-After before uvicorn's own, later deadline would cancel it (a
cancelled request task answers 500). Must not: know routes or models, or touch the batcher itself.
"""

from __future__ import annotations

import asyncio
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.api.slow_clients import http_protocol
from app.config import Settings

# uvicorn's own graceful-shutdown deadline comes this long after the service's grace: room for the batch that
# runs when the grace ends to finish and be sent. It is a backstop; past it uvicorn cancels what is left (500).
SHUTDOWN_BACKSTOP_S = 10.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app's service that shutdown began the moment the first signal arrives."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        service = getattr(self._app.state, "service", None)
        if first and service is not None and self._loop is not None:
            # A signal handler runs between bytecodes of the loop's thread: hand over, do not touch locks here.
            self._loop.call_soon_threadsafe(service.begin_shutdown)


def run(app: FastAPI, settings: Settings, host: str, port: int) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then drain: see the module docstring."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, http=http_protocol(settings),
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s + SHUTDOWN_BACKSTOP_S))
    DrainingServer(config, app).run()
