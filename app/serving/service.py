"""``ScoringService``: the one facade the HTTP layer calls, without HTTP.

Owns: lifecycle (load → subspace → warm-up → batcher → ready; shutdown grace; heap trimming), request checks (size,
rate), and scoring with one snapshot. Its parts, each with its own module: ``SharedEmbeddings`` (cache, in-flight
sharing, the batcher and its forward pass), ``SubspaceVersions`` (active version, list, activation),
``RefitJobs``, ``FleetFollower``. Must not: touch requests or responses, or hold the parts' logic. Model code runs
in the batcher's worker thread (forward passes) or worker threads (tokenizing; a version's probe items when it is
activated on a numeric path other than its own, ``app.core.numeric_path``), never on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app import metrics
from app.config import Settings
from app.core.anchoring import Activation
from app.core.embedding import Embedder, EmbeddingConfig, Encoded
from app.core.items import Item
from app.core.pipeline import FitOptions, Scored, score_encoded
from app.serving.cache import EmbeddingCache
from app.serving.embeddings import SharedEmbeddings
from app.serving.errors import ItemTooLarge, NotReady
from app.serving.fleet_follower import FleetFollower
from app.serving.memory import allocator, heap_stats, trim_every
from app.serving.ratelimit import RateLimited, RateLimiter
from app.serving.refit_jobs import RefitJobs
from app.serving.versions import SubspaceVersions
from app.store.artifacts import remove_stale_scratch_in
from app.store.fleet import Fleet, FleetUnavailable
from app.store.registry import ActiveSubspace, SubspaceRegistry

log = logging.getLogger(__name__)


REFIT_UPLOAD = "refitupload"  # scratch purpose of refit uploads in the temp dir (see artifacts.scratch_prefix)


def item_chars(item: Item) -> int:
    return sum(len(content) for _, content in item.turns)


def _heap_field(state: str) -> float:
    stats = heap_stats()
    return float(getattr(stats, state)) if stats is not None else float("nan")


class ScoringService:
    """Everything the HTTP layer needs, built once in the app's lifespan."""

    def __init__(self, settings: Settings, embedder: Embedder) -> None:
        self.settings = settings
        self.embedder = embedder
        self.rate_limiter = RateLimiter(settings.rate_limit_requests_per_s, settings.rate_limit_items_per_s,
                                        settings.rate_limit_burst_s)
        fleet = None
        if settings.redis_url:
            fleet = Fleet(settings.redis_url, prefix=settings.redis_prefix, name=settings.subspace_name,
                          replica_id=settings.replica_id, timeout_s=settings.redis_timeout_s,
                          lock_ttl_s=settings.refit_lock_ttl_s, job_ttl_s=settings.job_ttl_s)
        self.subspaces = SubspaceVersions(SubspaceRegistry(settings.models_dir, settings.subspace_name, embedder), fleet)
        self.cache = EmbeddingCache(settings.cache_max_bytes, settings.cache_ttl_s,
                                    redis=fleet.redis if fleet and settings.cache_redis else None, prefix=settings.redis_prefix)
        self.cache.redis_online = False
        self.embeddings = SharedEmbeddings(embedder, self.cache, settings)
        self.batcher = self.embeddings.batcher
        self.refits = RefitJobs(self.subspaces, embedder, self.embed, settings)
        self.follower = FleetFollower(self.subspaces, fleet, self.cache, self.refits, settings.redis_poll_s) if fleet else None
        self._accepting = False  # started and not shutting down
        self._tasks: list[asyncio.Task[None]] = []
        metrics.CACHE_BYTES.set_function(lambda: self.cache.local_bytes)  # the process's service (one per process)
        for state in ("in_use", "free", "mmapped"):
            metrics.HEAP_BYTES.labels(state).set_function(functools.partial(_heap_field, state))

    # ----------------------------------------------------------------------------- lifecycle
    @classmethod
    def load(cls, settings: Settings) -> ScoringService:
        return cls(settings, Embedder.from_settings(settings))

    @property
    def ready(self) -> bool:
        """Started, not shutting down, and a subspace is active."""
        return self._accepting and self.subspaces.current is not None

    async def start(self) -> None:
        """TEI's order: (model loaded) → subspace → warm-up → batcher → ready."""
        # Refit uploads of a predecessor killed mid-refit (kill -9 skips every cleanup).
        await asyncio.to_thread(remove_stale_scratch_in, Path(tempfile.gettempdir()), REFIT_UPLOAD)
        snapshot = await asyncio.to_thread(self.subspaces.registry.load_active)
        if snapshot is not None:
            self.subspaces.record(snapshot)
        if self.follower is not None:
            try:  # a replica that starts later serves the fleet's active version from its first request
                await self.follower.reconcile()
                self.follower.set_online(True)
            except FleetUnavailable as err:
                log.warning("starting degraded on the local active version: %s", err)
            snapshot = self.subspaces.current
            self._tasks.append(asyncio.create_task(self.follower.run(), name="fleet"))
        await asyncio.to_thread(self._warm_up, snapshot)
        self.batcher.start()
        # glibc keeps freed activations resident (RELIABILITY.md, Memory); jemalloc returns them itself
        if self.settings.malloc_trim_interval_s > 0 and allocator() == "glibc":
            self._tasks.append(asyncio.create_task(trim_every(self.settings.malloc_trim_interval_s, metrics.HEAP_TRIMS.inc),
                                                   name="heap-trim"))
        self._accepting = True
        log.info("ready; C allocator: %s", allocator())

    def _warm_up(self, snapshot: ActiveSubspace | None) -> None:
        config = snapshot.manifest.embedding if snapshot else EmbeddingConfig()
        self.embedder.forward(self.embedder.encode(["warm-up"], config), config)

    def begin_shutdown(self) -> None:
        """SIGTERM arrived (the server stops accepting): report not ready, and once ``shutdown_grace_s`` has passed,
        fail the work that has not started with ``BatcherClosed`` (503 + Retry-After) so no caller is cut off."""
        self._accepting = False
        grace = self.settings.shutdown_grace_s
        asyncio.get_running_loop().call_later(grace, self._shed_after_grace, grace)

    def _shed_after_grace(self, grace: float) -> None:
        shed = self.batcher.shed_waiting(f"the server is shutting down: this work did not start within the {grace:g} s grace; "
                                         "retry (another replica)")
        if shed:
            log.warning("shutdown grace of %g s over: %d queued items answered 503", grace, shed)

    async def stop(self) -> None:
        self._accepting = False
        await self.batcher.stop(drain=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.subspaces.fleet is not None:
            await self.subspaces.fleet.close()

    @property
    def health(self) -> str:
        """ready | degraded (scoring on the local version while Redis is unreachable) | not_ready."""
        if not self.ready:
            return "not_ready"
        return "degraded" if self.subspaces.fleet is not None and not self.subspaces.fleet_online else "ready"

    # ----------------------------------------------------------------------------- requests
    def snapshot(self, model: str | None = None) -> ActiveSubspace:
        """The active subspace, for one request; ``model`` as in ``SubspaceVersions.resolve`` (None: the active one)."""
        current = self.subspaces.current
        if current is None or not self.ready:
            raise NotReady("no active subspace yet: fit one (saft fit) or POST /subspace/refit")
        return self.subspaces.resolve(current, model)

    def model_info(self) -> dict[str, str]:
        """The loaded model as plain strings: id, weights digest, device and dtype (e.g. 'cpu', 'float32')."""
        return {"id": self.embedder.model_id, "weights_sha256": self.embedder.weights_digest,
                "device": str(self.embedder.device), "dtype": str(self.embedder.dtype).removeprefix("torch.")}

    def check_rate(self, caller: str, n_items: int = 0) -> None:
        """One request of ``caller`` with ``n_items`` items, against its rate limits (SAFT_RATE_LIMIT_*; off by default)."""
        try:
            self.rate_limiter.take(caller, n_items)
        except RateLimited:
            metrics.RATE_LIMITED.inc()
            raise

    def check_size(self, item: Item, where: str = "item") -> None:
        chars = item_chars(item)
        if chars > self.settings.max_chars_per_item:
            raise ItemTooLarge(f"{where}: {chars} characters exceed the limit of {self.settings.max_chars_per_item} per item")

    async def embed(self, items: Sequence[Item], config: EmbeddingConfig, *, wait: bool = False,
                    caller: str | None = None) -> tuple[list[Encoded], np.ndarray]:
        """Embed items through the cache, in-flight sharing and the batcher (``SharedEmbeddings.embed``)."""
        return await self.embeddings.embed(items, config, wait=wait, caller=caller)

    async def score(self, items: Sequence[Item], snapshot: ActiveSubspace, threshold: float | None, *,
                    wait: bool = False, caller: str | None = None) -> list[Scored]:
        """Score items with one snapshot (one version for the whole request); ``wait`` and ``caller`` as in ``embed``."""
        caller = caller if self.settings.fair_queuing else None
        encoded, vectors = await self.embed(items, snapshot.manifest.embedding, wait=wait, caller=caller)
        results = score_encoded(snapshot.subspace, snapshot.manifest, items, encoded, vectors, threshold)
        metrics.ITEMS_SCORED.inc(len(results))
        for r in results:
            metrics.VERDICTS.labels(r.verdict).inc()
        metrics.TRUNCATIONS.inc(sum(r.truncated for r in results))
        return results

    async def start_refit(self, upload: Path, options: FitOptions, activate: Activation = "auto", strict: bool = False) -> dict[str, Any]:
        """Start a refit job in a thread; 409 (RefitInProgress) while another one runs here or in the fleet."""
        return await self.refits.start(upload, options, activate, strict)
