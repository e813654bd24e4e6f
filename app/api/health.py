"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import ORJSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import get_service
from app.service import ScoringService

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Model loaded and a subspace active")
async def readyz(service: ScoringService = Depends(get_service)) -> ORJSONResponse:
    current = service.registry.current
    body = {
        "status": "ready" if service.ready else "not_ready",
        "model": service.embedder.model_id,
        "subspace": None if current is None else {"name": current.manifest.name, "version": current.manifest.version},
        "queue_depth": service.batcher.queue_depth,
    }
    return ORJSONResponse(body, status_code=200 if service.ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def prometheus() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
