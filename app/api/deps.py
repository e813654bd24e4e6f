"""Dependencies: the service instance, bearer-token checks (constant-time) and the caller's identity.

Owns: ``get_service``, ``require_client``, ``require_admin`` and the caller identity. Must not: keep, log or compare a
token other than in constant time, or know routes, models or scores.

The identity (a digest of the bearer token, else the client's address) is what the batcher shares the worker
between and what rate limits count; never the token itself, which stays out of memory structures and logs.

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in anyio's thread pool, a thread hop per
request and, under a burst, up to 40 worker threads that start and expire (each with its own allocator caches).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import Forbidden, Unauthorized
from app.serving.service import ScoringService

bearer = HTTPBearer(auto_error=False)


async def get_service(request: Request) -> ScoringService:
    return request.app.state.service


def _matches(token: str, candidates: list[str]) -> bool:
    # Compare against every candidate so timing does not reveal which (if any) matched.
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


def _identity(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is not None:
        return "token:" + hashlib.sha256(credentials.credentials.encode()).hexdigest()[:16]
    return "address:" + (request.client.host if request.client else "unknown")


async def require_client(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    service: ScoringService = Depends(get_service),
) -> str:
    """Scoring needs a client (or the admin) token when SAFT_API_TOKENS is set; returns the caller's identity."""
    settings = service.settings
    if settings.api_tokens:
        if credentials is None:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        allowed = settings.api_tokens + ([settings.admin_token] if settings.admin_token else [])
        if not _matches(credentials.credentials, allowed):
            raise Unauthorized("unknown bearer token")
    return _identity(request, credentials)


async def require_admin(
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    service: ScoringService = Depends(get_service),
) -> None:
    """Subspace writes need the admin token; without SAFT_ADMIN_TOKEN they are refused outright."""
    admin = service.settings.admin_token
    if not admin:
        raise Forbidden("admin writes are disabled: set SAFT_ADMIN_TOKEN to enable /subspace writes")
    if credentials is None:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    if not _matches(credentials.credentials, [admin]):
        if _matches(credentials.credentials, service.settings.api_tokens):
            raise Forbidden("a client token cannot write subspaces; use the admin token")
        raise Unauthorized("unknown bearer token")
