"""The serving layer's own faults, each mapped to a status by ``app.api.errors``' one table.

Owns: the exception types. Must not: import anything of the service (the facade and its parts raise these).
"""

from __future__ import annotations


class NotReady(RuntimeError):
    """No active subspace (or the model is still loading)."""


class RefitInProgress(RuntimeError):
    """A refit of this subspace is already running."""


class RegistryUnavailable(NotReady):
    """Redis is configured but unreachable: fleet writes (refit, activate) wait until it is back."""


class ItemTooLarge(ValueError):
    """An item longer than the configured character limit (refused, never cut silently)."""


class ModelNotServed(ValueError):
    """A request's ``model`` (``NAME`` or ``NAME@vN``) names a subspace or version this service does not score with."""
