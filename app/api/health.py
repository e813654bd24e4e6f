"""Liveness, readiness and Prometheus metrics.

Owns: /healthz, /readyz (the service's health, queue depth and Redis state) and /metrics (``app.metrics``'
collectors), none of which needs a token. Must not: touch the model or Redis itself, or define metrics; it reports
the state the service already holds.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import ORJSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import get_service
from app.serving.service import ScoringService

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Model loaded and a subspace active ('degraded': scoring, but Redis unreachable)")
async def readyz(service: ScoringService = Depends(get_service)) -> ORJSONResponse:
    current = service.subspaces.current
    status = service.health
    body = {
        "status": status,
        "model": service.embedder.model_id,
        "subspace": None if current is None else {"name": current.manifest.name, "version": current.manifest.version},
        "queue_depth": service.batcher.queue_depth,
        "redis": "not_configured" if service.subspaces.fleet is None else ("connected" if service.subspaces.fleet_online else "unreachable"),
    }
    return ORJSONResponse(body, status_code=503 if status == "not_ready" else 200)


@router.get("/metrics", summary="Prometheus metrics")
async def prometheus() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
