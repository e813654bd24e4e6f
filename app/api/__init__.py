"""The HTTP layer: thin FastAPI routers that translate between schemas and ``ScoringService``.

Owns: the routes, request parsing and uploads, the middleware, auth, the pydantic schemas and the one error table.
Must not: import torch, numpy or Redis, or embed or score itself (``ScoringService`` does); it is the top layer of
import-linter's layers contract (pyproject.toml), so nothing in ``app.serving``, ``app.store`` or ``app.core`` imports it.
"""
