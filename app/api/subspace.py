"""/subspace: the active version, versions, rollback, and refit jobs (writes need the admin token).

Owns: these routes, the admin check on writes, and spooling a refit upload to a temp file (named so that a start
removes a killed process's). Must not: fit, load, write or activate a version itself (the service's subspace
versions and refit jobs do), or let a client token write.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from app.api.deps import get_service, require_admin, require_client
from app.api.errors import NotFound, PayloadTooLarge
from app.api.schemas import JobState, RefitAccepted, SubspaceInfo, VersionList
from app.core.anchoring import Activation
from app.core.manifest import ArtifactError, Manifest
from app.core.pipeline import FitParams
from app.core.subspace import FitError
from app.serving.service import REFIT_UPLOAD, ScoringService
from app.store.artifacts import CorruptVersion, check_version, scratch_prefix

router = APIRouter(prefix="/subspace", tags=["subspace"])


async def _info(service: ScoringService, version: str) -> SubspaceInfo:
    try:
        manifest = await service.subspaces.manifest(check_version(version))
    except CorruptVersion:
        raise  # the store's fault (500), not a missing version
    except ArtifactError as err:
        raise NotFound(str(err)) from None
    current = service.subspaces.current
    return SubspaceInfo(name=manifest.name, version=manifest.version,
                        active=current is not None and current.manifest.version == manifest.version,
                        manifest=public_manifest(manifest))


def public_manifest(manifest: Manifest) -> dict[str, Any]:
    """The manifest as clients see it: the probe items (calibration texts, harmful ones among them) counted, not
    shown; the file under models/ keeps them."""
    data = manifest.to_json()
    data["probes"] = {"count": len(manifest.probes)}
    return data


@router.get("", response_model=SubspaceInfo, dependencies=[Depends(require_client)], summary="The active subspace")
async def active(service: ScoringService = Depends(get_service)) -> SubspaceInfo:
    snapshot = service.snapshot()
    return await _info(service, snapshot.manifest.version)


@router.get("/versions", response_model=VersionList, dependencies=[Depends(require_client)])
async def versions(service: ScoringService = Depends(get_service)) -> VersionList:
    current = service.subspaces.current
    return VersionList(name=service.subspaces.name, active=current.manifest.version if current else None,
                       versions=await service.subspaces.list())


@router.get("/versions/{version}", response_model=SubspaceInfo, dependencies=[Depends(require_client)])
async def version_info(version: str, service: ScoringService = Depends(get_service)) -> SubspaceInfo:
    return await _info(service, version)


@router.post("/versions/{version}/activate", response_model=SubspaceInfo, dependencies=[Depends(require_admin)],
             summary="Activate a published version (rollback or roll forward)")
async def activate(version: str, service: ScoringService = Depends(get_service)) -> SubspaceInfo:
    check_version(version)
    if version not in await service.subspaces.list():
        raise NotFound(f"subspace {service.subspaces.name!r} has no version {version!r}")
    await service.subspaces.activate(version)
    return await _info(service, version)


class RefitParams(FitParams):
    """The refit's query string: the fit's parameters (``FitParams``) and what to do with the new version."""

    activate: Literal["auto", "always", "never", "true", "false"] = Field(
        "auto", description="auto: activate unless the new version and the active one disagree on the upload past the "
        "guard's bounds (the job says why); always (or true); never (or false).")
    strict: bool = Field(False, description="Fail at the first invalid line instead of rejecting it (listed in the manifest).")


@router.post(
    "/refit",
    status_code=202,
    response_model=RefitAccepted,
    dependencies=[Depends(require_admin)],
    summary="Refit from an uploaded calibration JSONL (labelled or not); returns a job id",
    openapi_extra={"requestBody": {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}, "required": True}},
)
async def refit(
    request: Request,
    params: Annotated[RefitParams, Query()],
    service: ScoringService = Depends(get_service),
) -> RefitAccepted:
    options = params.options()
    service.embedder.normalize_layers(options.embedding.layers)  # a bad layer is a 422 now, not a failed job later
    limit = service.settings.max_upload_bytes
    fd, path = tempfile.mkstemp(prefix=scratch_prefix(REFIT_UPLOAD))  # named by pid: a start removes a killed one's
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body: upload exceeds the limit of {limit} bytes")
                fh.write(chunk)
        if size == 0:
            raise FitError("body: the calibration upload is empty")
    except BaseException:
        os.unlink(path)
        raise
    activation: Activation = {"true": "always", "false": "never"}.get(params.activate, params.activate)  # type: ignore[assignment]  # the dict maps true/false away
    job = await service.start_refit(Path(path), options, activation, params.strict)
    return RefitAccepted(job_id=job["job_id"], status=job["status"])


@router.get("/jobs/{job_id}", response_model=JobState, dependencies=[Depends(require_client)])
async def job(job_id: str, service: ScoringService = Depends(get_service)) -> JobState:
    state = await service.refits.job(job_id)
    if state is None:
        raise NotFound(f"no refit job {job_id!r}")
    return JobState(**state)
