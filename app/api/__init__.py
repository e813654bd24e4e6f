"""The HTTP layer: thin FastAPI routers that translate between schemas and ``ScoringService``."""
