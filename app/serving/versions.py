"""Which subspace version this replica scores with, and which versions exist, here and in the fleet.

Owns: ``SubspaceVersions`` — the active snapshot, the version list (the fleet's while Redis is reachable, else this
disk's), a version's manifest (installed from Redis first when another replica published it), activation (the fleet's
pointer, then this replica), adoption under one lock, the ``model`` name a request may give, whether Redis is reachable
(``fleet_online``, set by the fleet follower), and the active-version metric. Must not: know HTTP, the model, the
batcher or refit jobs; writes go through the registry (``app.store.registry``) and the fleet (``app.store.fleet``).
"""

from __future__ import annotations

import asyncio
import logging

from app import metrics
from app.core.manifest import ArtifactError, Manifest
from app.serving.errors import ModelNotServed, RegistryUnavailable
from app.store.artifacts import VERSION_RE
from app.store.fleet import Fleet, FleetUnavailable
from app.store.registry import ActiveSubspace, SubspaceRegistry

log = logging.getLogger(__name__)


class SubspaceVersions:
    """The versions of one subspace as one replica sees them (see the module docstring)."""

    def __init__(self, registry: SubspaceRegistry, fleet: Fleet | None) -> None:
        self.registry = registry
        self.fleet = fleet
        self.fleet_online = False  # Redis reachable; only the fleet follower changes it
        self._adopt_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.registry.name

    @property
    def current(self) -> ActiveSubspace | None:
        return self.registry.current

    def record(self, snapshot: ActiveSubspace) -> None:
        """Export ``snapshot`` as the active version (``saft_active_version``)."""
        metrics.ACTIVE_VERSION.labels(snapshot.manifest.name).set(int(snapshot.manifest.version[1:]))

    def resolve(self, snapshot: ActiveSubspace, model: str | None) -> ActiveSubspace:
        """``snapshot`` if a request's ``model`` names it (``NAME`` or ``NAME@vN``; None: the active one).

        Only the active version is served: another version would need its own load (and, in a fleet, its
        install) per request; activate it instead (POST /subspace/versions/{version}/activate).
        """
        if model is None:
            return snapshot
        m = snapshot.manifest
        name, at, version = model.partition("@")
        if at and not VERSION_RE.fullmatch(version):
            raise ModelNotServed(f"model: {model!r} must be NAME or NAME@vN (e.g. {m.name!r} or '{m.name}@{m.version}')")
        if name != m.name:
            raise ModelNotServed(f"model: {model!r} is not served here; this service scores with subspace {m.name!r} "
                                 f"(model {m.name!r} or '{m.name}@{m.version}')")
        if at and version != m.version:
            raise ModelNotServed(f"model: {model!r} names version {version}, but only the active version {m.version} is "
                                 f"served; ask for '{m.name}@{m.version}' or activate {version} first")
        return snapshot

    def require_fleet(self) -> Fleet | None:
        """The fleet for a write (None without Redis); refused while Redis is configured but unreachable."""
        if self.fleet is not None and not self.fleet_online:
            raise RegistryUnavailable("Redis is unreachable: subspace writes are refused until it is back "
                                      "(scoring continues on the local active version)")
        return self.fleet

    async def list(self) -> list[str]:
        """Published versions: the fleet's when Redis is configured and reachable, else this disk's."""
        if self.fleet is not None and self.fleet_online:
            try:
                return await self.fleet.versions()
            except FleetUnavailable:
                pass
        return await asyncio.to_thread(self.registry.versions)

    async def manifest(self, version: str) -> Manifest:
        """A version's manifest; one published by another replica is installed here first."""
        if version not in await asyncio.to_thread(self.registry.versions):
            await self._install_from_fleet(version)
        return await asyncio.to_thread(self.registry.manifest, version)

    async def _install_from_fleet(self, version: str) -> None:
        if self.fleet is None:
            return
        try:
            files = await self.fleet.fetch(version)
        except FleetUnavailable:
            return
        if files is not None:
            await asyncio.to_thread(self.registry.install, version, files)

    async def activate(self, version: str) -> ActiveSubspace:
        """Roll back or forward; in a fleet every replica follows within ``redis_poll_s``."""
        fleet = self.require_fleet()
        if fleet is not None:
            try:
                await fleet.set_active(version)
            except KeyError as err:
                raise ArtifactError(err.args[0]) from None
            except FleetUnavailable as err:
                raise RegistryUnavailable(str(err)) from None
        return await self.adopt(version)

    async def adopt(self, version: str) -> ActiveSubspace:
        """Make ``version`` active here (installing it from Redis if this disk lacks it)."""
        async with self._adopt_lock:
            current = self.registry.current
            if current is not None and current.manifest.version == version:
                return current
            if version not in await asyncio.to_thread(self.registry.versions):
                await self._install_from_fleet(version)
            snapshot = await asyncio.to_thread(self.registry.activate, version)
            self.record(snapshot)
            log.info("active subspace is now %s/%s", snapshot.manifest.name, version)
            return snapshot
