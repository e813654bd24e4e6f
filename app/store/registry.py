"""The service's view of subspace versions: the active snapshot, hot swap, publication.

Fitted state is immutable: a request takes one ``ActiveSubspace`` snapshot and is scored entirely
by it, while a refit or rollback swaps the reference for later requests.

Owns: ``ActiveSubspace`` and ``SubspaceRegistry``: the local versions of one name (loading the active one, checked
against the model), thread-safe swaps, publication to disk and installing what another replica published. Must not:
know HTTP, the serving layer or Redis (``app.store.fleet``; the service ties the two), or change a published version.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from app.core.embedding import Embedder
from app.core.subspace import Subspace
from app.store.artifacts import (
    Manifest,
    active_version,
    check_compatible,
    install_version,
    list_versions,
    load_version,
    remove_stale_scratch,
    render_version,
    save_version,
    set_active,
    version_files,
)


@dataclass(frozen=True, slots=True)
class ActiveSubspace:
    """One published version, ready to score."""

    subspace: Subspace
    manifest: Manifest


class SubspaceRegistry:
    """Versions of one subspace name under ``models/``; thread-safe swaps."""

    def __init__(self, root: Path, name: str, embedder: Embedder) -> None:
        self.root = root
        self.name = name
        self.embedder = embedder
        self._lock = threading.Lock()
        self._current: ActiveSubspace | None = None

    @property
    def current(self) -> ActiveSubspace | None:
        return self._current

    def load_active(self) -> ActiveSubspace | None:
        """Load the version that ``models/<name>/ACTIVE`` names (None when there is none yet)."""
        remove_stale_scratch(self.root, self.name)  # what a kill -9 mid-write left behind
        version = active_version(self.root, self.name)
        return None if version is None else self.activate(version, persist=False)

    def _load(self, version: str) -> ActiveSubspace:
        subspace, manifest = load_version(self.root, self.name, version)
        check_compatible(manifest, subspace, self.embedder)
        return ActiveSubspace(subspace, manifest)

    def activate(self, version: str, *, persist: bool = True) -> ActiveSubspace:
        """Make ``version`` active for new requests (and, with ``persist``, for later starts)."""
        snapshot = self._load(version)
        with self._lock:
            if persist:
                set_active(self.root, self.name, version)
            self._current = snapshot
        return snapshot

    def publish(self, subspace: Subspace, manifest: Manifest, *, activate: bool) -> Manifest:
        """Write a new immutable version atomically; swap it in when ``activate``."""
        with self._lock:
            saved = save_version(self.root, subspace, manifest, activate=activate)
            if activate:
                self._current = ActiveSubspace(subspace, saved)
        return saved

    def files(self, version: str) -> dict[str, bytes]:
        """A version's bytes, as published to the fleet."""
        return version_files(self.root, self.name, version)

    def install(self, version: str, files: dict[str, bytes]) -> None:
        """Write a version another replica published (idempotent; immutable)."""
        install_version(self.root, self.name, version, files)

    @staticmethod
    def render(subspace: Subspace, manifest: Manifest, version: str) -> dict[str, bytes]:
        """A new version's bytes, to publish to the fleet before any replica installs it."""
        return render_version(subspace, manifest, version)

    def versions(self) -> list[str]:
        return list_versions(self.root, self.name)

    def manifest(self, version: str) -> Manifest:
        return load_version(self.root, self.name, version)[1]
