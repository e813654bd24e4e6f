"""``ScoringService``: the one facade the HTTP layer calls, without HTTP.

Owns: lifecycle (load → subspace → warm-up → batcher → ready; shutdown grace; heap trimming), request checks (size,
rate), scoring with one snapshot, versions and activation. Its parts: ``SharedEmbeddings`` (cache, in-flight sharing,
batching), ``RefitJobs``, ``FleetFollower``. Must not: touch requests or responses. Model code runs only in the
batcher's worker thread (forward passes) or worker threads (tokenizing), never on the loop.
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
from app.core.manifest import ArtifactError, Manifest
from app.core.pipeline import FitOptions, Scored, score_encoded
from app.serving.batching import BatchStats, MicroBatcher
from app.serving.cache import EmbeddingCache
from app.serving.embeddings import SharedEmbeddings
from app.serving.errors import ItemTooLarge, ModelNotServed, NotReady, RegistryUnavailable
from app.serving.fleet_follower import FleetFollower
from app.serving.memory import heap_stats, trim
from app.serving.ratelimit import RateLimited, RateLimiter
from app.serving.refit_jobs import RefitJobs
from app.store.artifacts import VERSION_RE, remove_stale_scratch_in
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
        self.registry = SubspaceRegistry(settings.models_dir, settings.subspace_name, embedder)
        self.rate_limiter = RateLimiter(settings.rate_limit_requests_per_s, settings.rate_limit_items_per_s,
                                        settings.rate_limit_burst_s)
        self.fleet: Fleet | None = None
        if settings.redis_url:
            self.fleet = Fleet(settings.redis_url, prefix=settings.redis_prefix, name=settings.subspace_name,
                               replica_id=settings.replica_id, timeout_s=settings.redis_timeout_s,
                               lock_ttl_s=settings.refit_lock_ttl_s, job_ttl_s=settings.job_ttl_s)
        self.fleet_online = False
        self.cache = EmbeddingCache(settings.cache_max_bytes, settings.cache_ttl_s,
                                    redis=self.fleet.redis if self.fleet and settings.cache_redis else None,
                                    prefix=settings.redis_prefix)
        self.cache.redis_online = False
        self._adopt_lock = asyncio.Lock()
        self._fleet_task: asyncio.Task[None] | None = None
        self.batcher: MicroBatcher[tuple[Encoded, EmbeddingConfig], np.ndarray] = MicroBatcher(
            self._forward,
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            on_batch=self._on_batch,
            feeder_nice=settings.feeder_nice,
            max_padding=settings.max_batch_padding,
            max_queue_per_caller=settings.client_queue_share,
        )
        self.loop: asyncio.AbstractEventLoop | None = None  # the service's event loop, for its worker threads
        self.refits = RefitJobs(self)
        self.embeddings = SharedEmbeddings(embedder, self.cache, self.batcher)
        self.follower = FleetFollower(self, self.fleet) if self.fleet is not None else None
        self.ready = False
        self._trim_task: asyncio.Task[None] | None = None
        metrics.CACHE_BYTES.set_function(lambda: self.cache.local_bytes)
        for state in ("in_use", "free", "mmapped"):
            metrics.HEAP_BYTES.labels(state).set_function(functools.partial(_heap_field, state))

    # ----------------------------------------------------------------------------- lifecycle
    @classmethod
    def load(cls, settings: Settings) -> ScoringService:
        return cls(settings, Embedder.from_settings(settings))

    async def start(self) -> None:
        """TEI's order: (model loaded) → subspace → warm-up → batcher → ready."""
        self.loop = asyncio.get_running_loop()
        # Refit uploads of a predecessor killed mid-refit (kill -9 skips every cleanup).
        await asyncio.to_thread(remove_stale_scratch_in, Path(tempfile.gettempdir()), REFIT_UPLOAD)
        snapshot = await asyncio.to_thread(self.registry.load_active)
        if snapshot is not None:
            self.record_version(snapshot)
        if self.follower is not None:
            try:  # a replica that starts later serves the fleet's active version from its first request
                await self.follower.reconcile()
                self.follower.set_online(True)
            except FleetUnavailable as err:
                log.warning("starting degraded on the local active version: %s", err)
            snapshot = self.registry.current
            self._fleet_task = asyncio.create_task(self.follower.run(), name="fleet")
        await asyncio.to_thread(self._warm_up, snapshot)
        self.batcher.start()
        if self.settings.malloc_trim_interval_s > 0:
            self._trim_task = asyncio.create_task(self._trim_heap_loop(self.settings.malloc_trim_interval_s), name="heap-trim")
        self.ready = snapshot is not None

    def begin_shutdown(self) -> None:
        """SIGTERM arrived (the server stops accepting): report not ready, and once ``shutdown_grace_s`` has passed,
        fail the work that has not started with ``BatcherClosed`` (503 + Retry-After) so no caller is cut off."""
        self.ready = False
        grace = self.settings.shutdown_grace_s
        asyncio.get_running_loop().call_later(grace, self._shed_after_grace, grace)

    async def _trim_heap_loop(self, interval_s: float) -> None:
        """Every ``interval_s``, hand glibc's free heap pages back to the OS (off the loop's thread): freed activations
        of past batches otherwise stay resident at every arena's high-water mark (RELIABILITY.md, Memory)."""
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(trim)
            metrics.HEAP_TRIMS.inc()

    def _shed_after_grace(self, grace: float) -> None:
        shed = self.batcher.shed_waiting(f"the server is shutting down: this work did not start within the {grace:g} s grace; "
                                         "retry (another replica)")
        if shed:
            log.warning("shutdown grace of %g s over: %d queued items answered 503", grace, shed)

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop(drain=True)
        for task in (self._fleet_task, self._trim_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.fleet is not None:
            await self.fleet.close()

    @property
    def health(self) -> str:
        """ready | degraded (scoring on the local version while Redis is unreachable) | not_ready."""
        if not self.ready:
            return "not_ready"
        return "degraded" if self.fleet is not None and not self.fleet_online else "ready"

    def _warm_up(self, snapshot: ActiveSubspace | None) -> None:
        config = snapshot.manifest.embedding if snapshot else EmbeddingConfig()
        self.embedder.forward(self.embedder.encode(["warm-up"], config), config)

    # ----------------------------------------------------------------------------- scoring
    def _forward(self, batch: Sequence[tuple[Encoded, EmbeddingConfig]]) -> list[np.ndarray]:
        """Runs in the batcher's worker thread: one forward pass for one embedding config."""
        config = batch[0][1]
        vectors = list(self.embedder.forward([enc for enc, _ in batch], config))
        return vectors

    def _on_batch(self, stats: BatchStats) -> None:
        metrics.BATCH_SIZE.observe(stats.size)
        metrics.BATCH_TOKENS.observe(stats.padded_tokens)
        if stats.padded_tokens:
            metrics.BATCH_PADDING.observe(1 - stats.real_tokens / stats.padded_tokens)
        metrics.PADDING_TOKENS.inc(stats.padded_tokens - stats.real_tokens)
        metrics.REAL_TOKENS.inc(stats.real_tokens)
        metrics.INFERENCE_SECONDS.observe(stats.seconds)
        metrics.QUEUE_DEPTH.set(stats.queue_depth)

    def snapshot(self) -> ActiveSubspace:
        current = self.registry.current
        if current is None or not self.ready:
            raise NotReady("no active subspace yet: fit one (saft fit) or POST /subspace/refit")
        return current

    def snapshot_for(self, model: str | None) -> ActiveSubspace:
        """The snapshot a request's ``model`` names: the active subspace as ``NAME`` or ``NAME@vN`` (None: the active one).

        Only the active version is served: another version would need its own load (and, in a fleet, its
        install) per request; activate it instead (POST /subspace/versions/{version}/activate).
        """
        snapshot = self.snapshot()
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

    # ----------------------------------------------------------------------------- subspaces
    def record_version(self, snapshot: ActiveSubspace) -> None:
        metrics.ACTIVE_VERSION.labels(snapshot.manifest.name).set(int(snapshot.manifest.version[1:]))

    def require_fleet(self) -> Fleet | None:
        if self.fleet is not None and not self.fleet_online:
            raise RegistryUnavailable("Redis is unreachable: subspace writes are refused until it is back "
                                      "(scoring continues on the local active version)")
        return self.fleet

    async def versions(self) -> list[str]:
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
            self.record_version(snapshot)
            self.ready = True
            log.info("active subspace is now %s/%s", snapshot.manifest.name, version)
            return snapshot

    # ----------------------------------------------------------------------------- refit jobs (app.serving.refit_jobs)
    async def job(self, job_id: str) -> dict[str, Any] | None:
        """A job's state as the fleet sees it (any replica's job), else this replica's."""
        return await self.refits.job(job_id)

    async def start_refit(self, upload: Path, options: FitOptions, activate: Activation = "auto", strict: bool = False) -> dict[str, Any]:
        """Start a refit job in a thread; 409 (RefitInProgress) while another one runs here or in the fleet."""
        return await self.refits.start(upload, options, activate, strict)
