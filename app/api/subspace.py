"""/subspace: the active version, versions, rollback, and refit jobs (writes need the admin token)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from app.anchoring import Activation
from app.api.deps import get_service, require_admin, require_client
from app.api.errors import NotFound, PayloadTooLarge
from app.artifacts import ArtifactError, CorruptVersion, check_version, scratch_prefix
from app.embedding import EmbeddingConfig
from app.pipeline import DEFAULT_FIT_EMBEDDING, FitOptions
from app.quality import ThresholdPolicy
from app.schemas import JobState, RefitAccepted, SubspaceInfo, VersionList
from app.service import REFIT_UPLOAD, ScoringService
from app.subspace import FitError

_FIT = FitOptions()  # the refit's defaults are the fit's (one place: FitOptions)

router = APIRouter(prefix="/subspace", tags=["subspace"])


async def _info(service: ScoringService, version: str) -> SubspaceInfo:
    try:
        manifest = await service.manifest(check_version(version))
    except CorruptVersion:
        raise  # the store's fault (500), not a missing version
    except ArtifactError as err:
        raise NotFound(str(err)) from None
    current = service.registry.current
    return SubspaceInfo(name=manifest.name, version=manifest.version,
                        active=current is not None and current.manifest.version == manifest.version, manifest=manifest.to_json())


@router.get("", response_model=SubspaceInfo, dependencies=[Depends(require_client)], summary="The active subspace")
async def active(service: ScoringService = Depends(get_service)) -> SubspaceInfo:
    snapshot = service.snapshot()
    return await _info(service, snapshot.manifest.version)


@router.get("/versions", response_model=VersionList, dependencies=[Depends(require_client)])
async def versions(service: ScoringService = Depends(get_service)) -> VersionList:
    current = service.registry.current
    return VersionList(name=service.registry.name, active=current.manifest.version if current else None,
                       versions=await service.versions())


@router.get("/versions/{version}", response_model=SubspaceInfo, dependencies=[Depends(require_client)])
async def version_info(version: str, service: ScoringService = Depends(get_service)) -> SubspaceInfo:
    return await _info(service, version)


@router.post("/versions/{version}/activate", response_model=SubspaceInfo, dependencies=[Depends(require_admin)],
             summary="Activate a published version (rollback or roll forward)")
async def activate(version: str, service: ScoringService = Depends(get_service)) -> SubspaceInfo:
    check_version(version)
    if version not in await service.versions():
        raise NotFound(f"subspace {service.registry.name!r} has no version {version!r}")
    await service.activate(version)
    return await _info(service, version)


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
    layers: str = Query(",".join(map(str, DEFAULT_FIT_EMBEDDING.layers)), description="Comma-separated layer indices (negative from the end).", pattern=r"^-?\d+(,-?\d+)*$"),
    pooling: Literal["last", "mean", "response"] = DEFAULT_FIT_EMBEDDING.pooling,
    template: Literal["judge", "chat", "plain"] = DEFAULT_FIT_EMBEDDING.template,
    max_length: int = Query(DEFAULT_FIT_EMBEDDING.max_length, ge=8, le=32768),
    truncation_side: Literal["left", "right"] = DEFAULT_FIT_EMBEDDING.truncation_side,
    method: Literal["auto", "saft", "lda"] = Query("auto", description="auto: lda when the upload is labelled, else saft"),
    k: int = Query(_FIT.k, ge=1, le=4096),
    center: Literal["global", "kind"] = _FIT.center,  # type: ignore[assignment]  # FitOptions.center is a str until FitParams (step 3)
    standardize: bool = _FIT.standardize,
    shrinkage: float = Query(_FIT.shrinkage, ge=0.0, le=1.0),
    balance: Literal["item", "source"] = Query(_FIT.balance, description="item: every line weighs the same; source: every "
                                               "'source' field value weighs the same within its label"),
    nuisance: int = Query(_FIT.nuisance, ge=0, le=64, description="lda: directions of between-benign-source spread projected out"),
    cross_fit: Literal["none", "source"] = Query(_FIT.cross_fit, description="source: τ and P(harmful) from source-held-out "
                                                 "scores (labelled uploads with 2+ 'source' values)"),
    policy: str | None = Query(None, description="max_f1 | fpr:R | recall:R | drop_rate:Q (default: fpr:0.05 labelled, drop_rate:0.1 not)"),
    mode: Literal["combine", "replace"] = Query(_FIT.mode, description="combine: add the upload to the active version's "
                                               "stored calibration (unlabeled lines labelled by its verdicts; τ carried over); "
                                               "replace: fit on the upload alone (unlabeled: the paper's SAFT score)"),
    labelled_weight: float = Query(_FIT.labelled_weight, gt=0, le=1000, description="combine: how many calibration sources "
                                   "the upload's labelled lines weigh as"),
    pseudo_weight: float = Query(_FIT.pseudo_weight, ge=0, le=1000, description="combine: how many calibration sources "
                                 "the upload's unlabeled lines weigh as"),
    activate: Literal["auto", "always", "never", "true", "false"] = Query(
        "auto", description="auto: activate unless the new version and the active one disagree on the upload past the "
        "guard's bounds (the job says why); always (or true); never (or false)."),
    strict: bool = Query(False, description="Fail at the first invalid line instead of rejecting it (listed in the manifest)."),
    service: ScoringService = Depends(get_service),
) -> RefitAccepted:
    options = FitOptions(
        embedding=EmbeddingConfig(tuple(int(x) for x in layers.split(",")), pooling, template, max_length, truncation_side),
        method=method, k=k, center=center, standardize=standardize, shrinkage=shrinkage, balance=balance, nuisance=nuisance,
        policy=ThresholdPolicy.parse(policy) if policy else None, cross_fit=cross_fit, mode=mode,
        labelled_weight=labelled_weight, pseudo_weight=pseudo_weight,
    )
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
    activation: Activation = {"true": "always", "false": "never"}.get(activate, activate)  # type: ignore[assignment]  # the dict maps true/false away
    job = await service.start_refit(Path(path), options, activation, strict)
    return RefitAccepted(job_id=job["job_id"], status=job["status"])


@router.get("/jobs/{job_id}", response_model=JobState, dependencies=[Depends(require_client)])
async def job(job_id: str, service: ScoringService = Depends(get_service)) -> JobState:
    state = await service.job(job_id)
    if state is None:
        raise NotFound(f"no refit job {job_id!r}")
    return JobState(**state)
