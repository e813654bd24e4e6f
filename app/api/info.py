"""GET /info (as TEI's): the model, the active subspace, its embedding and the request limits.

Clients size their batches from it. It needs a client token, as /score does: it names τ.

Owns: the ``InfoResponse`` built from the settings, the service's model and the active manifest. Must not: touch the
model, the batcher or Redis, or answer without a client token.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app import __version__
from app.api.deps import get_service, require_client
from app.api.schemas import InfoLimits, InfoModel, InfoResponse, InfoSubspace
from app.serving.service import ScoringService

router = APIRouter(tags=["health"], dependencies=[Depends(require_client)])


@router.get("/info", response_model=InfoResponse, summary="Model, active subspace, embedding config and request limits")
async def info(service: ScoringService = Depends(get_service)) -> InfoResponse:
    settings = service.settings
    current = service.subspaces.current
    m = None if current is None else current.manifest
    subspace = None if m is None else InfoSubspace(
        name=m.name, version=m.version, method=m.method, threshold=m.threshold,
        thresholds={k: m.threshold_for(k) for k in sorted({"text", "pair", *m.thresholds})}, calibrated=m.probability is not None,
    )
    limits = InfoLimits(
        max_items_per_request=settings.max_items_per_request, max_chars_per_item=settings.max_chars_per_item,
        max_body_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes,
        max_tokens=None if m is None else m.embedding.max_length, max_batch_tokens=settings.max_batch_tokens,
        max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
    )
    return InfoResponse(package="saft-filter", version=__version__, model=InfoModel(**service.model_info()), subspace=subspace,
                        embedding=None if m is None else m.embedding.as_dict(), limits=limits)
