"""A replica following its fleet: Redis connectivity, reconciliation on (re)connection, and the active version.

Owns: the online/degraded state (``SubspaceVersions.fleet_online``, the cache's Redis tier, the metric), flushing job
states written during an outage, seeding versions Redis lacks, and adopting the fleet's active version from pub/sub
events or, as the fallback, a periodic pointer check. Must not: know HTTP, the model or the facade; it adopts versions
through ``SubspaceVersions``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app import metrics
from app.core.manifest import ArtifactError
from app.serving.cache import EmbeddingCache
from app.serving.refit_jobs import RefitJobs
from app.serving.versions import SubspaceVersions
from app.store.fleet import Fleet, FleetUnavailable, VersionConflict

log = logging.getLogger(__name__)


class FleetFollower:
    """Keeps one replica in step with its fleet (see the module docstring)."""

    def __init__(self, versions: SubspaceVersions, fleet: Fleet, cache: EmbeddingCache, refits: RefitJobs,
                 poll_s: float) -> None:
        self.versions = versions
        self.fleet = fleet
        self.cache = cache
        self.refits = refits
        self.poll_s = poll_s

    def set_online(self, online: bool) -> None:
        if online != self.versions.fleet_online:
            log.log(logging.INFO if online else logging.WARNING, "Redis %s", "connected" if online else "unreachable: degraded")
        self.versions.fleet_online = online
        self.cache.redis_online = online
        metrics.FLEET_ONLINE.set(int(online))

    async def reconcile(self) -> None:
        """On (re)connection: flush job states written during an outage, publish local versions Redis
        lacks (a first start, or a Redis that lost its data), then follow the fleet's active version."""
        for job_id, job in list(self.refits.pending.items()):
            await self.fleet.put_job(job)
            self.refits.pending.pop(job_id, None)
        published = set(await self.fleet.versions())
        for version in await asyncio.to_thread(self.versions.registry.versions):
            if version not in published:
                try:
                    await self.fleet.seed(version, await asyncio.to_thread(self.versions.registry.files, version))
                except VersionConflict as err:
                    log.error("not publishing local version: %s", err)
        active = await self.fleet.active()
        current = self.versions.registry.current
        if active is None and current is not None:
            await self.fleet.seed_active(current.manifest.version)
            active = await self.fleet.active()
        if active is not None:
            try:
                await self.versions.adopt(active)
            except ArtifactError as err:  # e.g. fitted on another model: keep serving what we have
                log.error("cannot adopt the fleet's active version %s: %s", active, err)

    async def run(self) -> None:
        """Follow the fleet: pub/sub events, a periodic pointer check as the fallback, reconnection."""
        backoff = 0.1
        while True:
            try:
                if not self.versions.fleet_online:
                    await self.fleet.ping()
                    await self.reconcile()
                    self.set_online(True)
                    backoff = 0.1
                listen = asyncio.create_task(self.fleet.listen(self._on_event))
                poll = asyncio.create_task(self._poll_active())
                try:
                    done, _ = await asyncio.wait({listen, poll}, return_when=asyncio.FIRST_EXCEPTION)
                finally:
                    for task in (listen, poll):
                        task.cancel()
                    await asyncio.gather(listen, poll, return_exceptions=True)
                for task in done:
                    task.result()
            except FleetUnavailable as err:
                if self.versions.fleet_online:
                    log.warning("%s", err)
                self.set_online(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # the follower must outlive any one bad event (logged: not a blind except)
                log.exception("fleet sync failed; retrying")
                self.set_online(False)
                await asyncio.sleep(1.0)

    async def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("name") == self.versions.registry.name:
            await self._follow_pointer()

    async def _poll_active(self) -> None:
        while True:
            await self._follow_pointer()
            await asyncio.sleep(self.poll_s)

    async def _follow_pointer(self) -> None:
        active = await self.fleet.active()
        current = self.versions.registry.current
        if active is not None and (current is None or current.manifest.version != active):
            try:
                await self.versions.adopt(active)
            except ArtifactError as err:
                log.error("cannot adopt the fleet's active version %s: %s", active, err)
