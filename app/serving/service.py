"""The serving core: model + micro-batcher + subspace registry + refit jobs, without HTTP.

Routes call into ``ScoringService``; it never touches requests or responses. Model code runs only
in the batcher's worker thread (forward passes) or worker threads (tokenizing), never on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app import metrics
from app.config import Settings
from app.core.anchoring import Activation, GuardBounds, decide_activation
from app.core.embedding import Embedder, EmbeddingConfig, Encoded, cache_key
from app.core.items import Item
from app.core.manifest import ArtifactError, Manifest
from app.core.pipeline import FitOptions, Scored, file_digest, fit_lines, read_lines, score_encoded
from app.serving.batching import BatchStats, MicroBatcher, QueueFull
from app.serving.cache import CachedEmbedding, EmbeddingCache
from app.serving.memory import heap_stats, trim
from app.serving.ratelimit import RateLimited, RateLimiter
from app.store.artifacts import VERSION_RE, remove_stale_scratch_in
from app.store.fleet import Fleet, FleetUnavailable, RefitLease, RefitLocked, VersionConflict
from app.store.registry import ActiveSubspace, SubspaceRegistry

log = logging.getLogger(__name__)


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


REFIT_UPLOAD = "refitupload"  # scratch purpose of refit uploads in the temp dir (see artifacts.scratch_prefix)


def item_chars(item: Item) -> int:
    return sum(len(content) for _, content in item.turns)


class JobStore:
    """Refit job states in memory (one replica); the Redis store replaces it for a fleet."""

    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def create(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        job: dict[str, Any] = {"job_id": uuid.uuid4().hex, "name": name, "status": "queued", "progress": {"lines": 0},
               "options": options, "version": None, "activated": False, "quality": None, "rejected": None, "error": None,
               "created_at": time.time(), "finished_at": None}
        with self._lock:
            self._jobs[job["job_id"]] = job
        return dict(job)

    def update(self, job_id: str, **fields: Any) -> None:
        with self._lock:
            self._jobs[job_id].update(fields)

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else dict(job)


def _heap_field(state: str) -> float:
    stats = heap_stats()
    return float(getattr(stats, state)) if stats is not None else float("nan")


class ScoringService:
    """Everything the HTTP layer needs, built once in the app's lifespan."""

    def __init__(self, settings: Settings, embedder: Embedder) -> None:
        self.settings = settings
        self.embedder = embedder
        self.registry = SubspaceRegistry(settings.models_dir, settings.subspace_name, embedder)
        self.jobs = JobStore()
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
        self._pending_jobs: dict[str, dict[str, Any]] = {}  # job states not yet in Redis (written during an outage)
        self._inflight: dict[str, asyncio.Future[CachedEmbedding | None]] = {}  # cache key → its embedding in progress
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
        self._refit_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
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
        self._loop = asyncio.get_running_loop()
        # Refit uploads of a predecessor killed mid-refit (kill -9 skips every cleanup).
        await asyncio.to_thread(remove_stale_scratch_in, Path(tempfile.gettempdir()), REFIT_UPLOAD)
        snapshot = await asyncio.to_thread(self.registry.load_active)
        if snapshot is not None:
            self._record_version(snapshot)
        if self.fleet is not None:
            try:  # a replica that starts later serves the fleet's active version from its first request
                await self._reconcile()
                self._set_fleet_online(True)
            except FleetUnavailable as err:
                log.warning("starting degraded on the local active version: %s", err)
            snapshot = self.registry.current
            self._fleet_task = asyncio.create_task(self._fleet_loop(), name="fleet")
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

    def _format_and_key(self, items: Sequence[Item], config: EmbeddingConfig) -> tuple[list[str], list[int | None], list[str]]:
        texts, response_chars = self.embedder.format_items(items, config)
        keys = [cache_key(self.embedder.weights_digest, config, text) for text in texts]
        return texts, response_chars, keys

    async def embed(self, items: Sequence[Item], config: EmbeddingConfig, *, wait: bool = False,
                    caller: str | None = None) -> tuple[list[Encoded], np.ndarray]:
        """Embed items, each distinct input once: cached ones (local, then Redis) are not run again,
        duplicates within the call share one forward pass, and an input another request is already
        embedding is awaited rather than run twice; the rest wait for the shared inference worker.

        A full queue raises ``QueueFull`` — unless ``wait`` (streams that cannot answer 429 halfway):
        then the call stands in line for room, ahead of every later caller. ``caller`` (a client's identity)
        shares the inference worker fairly with other callers and holds at most its share of the queue."""
        texts, response_chars, keys = await asyncio.to_thread(self._format_and_key, items, config)
        cached, local_hits, redis_hits = await self.cache.get_many(keys)
        first: dict[str, int] = {}  # key → index of its first uncached occurrence
        for i, (key, entry) in enumerate(zip(keys, cached, strict=True)):
            if entry is None and key not in first:
                first[key] = i
        sharing = self.cache.enabled  # with the cache off, requests share nothing
        awaited = {key: self._inflight[key] for key in first if key in self._inflight} if sharing else {}
        own = [i for key, i in first.items() if key not in awaited]
        metrics.CACHE_HITS.labels("local").inc(local_hits)
        metrics.CACHE_HITS.labels("redis").inc(redis_hits)
        metrics.CACHE_HITS.labels("request").inc(len(items) - local_hits - redis_hits - len(first))
        metrics.CACHE_HITS.labels("inflight").inc(len(awaited))
        metrics.CACHE_MISSES.inc(len(own))
        embed_own = self._embed_owned if sharing else self._embed_uncached
        fresh = await embed_own(own, texts, response_chars, keys, config, wait, caller)
        if awaited:
            shared = await asyncio.gather(*(asyncio.shield(f) for f in awaited.values()))
            fresh.update((key, entry) for key, entry in zip(awaited, shared, strict=True) if entry is not None)
            abandoned = [first[key] for key in awaited if key not in fresh]  # their request failed or left: run them here
            metrics.CACHE_MISSES.inc(len(abandoned))
            fresh.update(await self._embed_uncached(abandoned, texts, response_chars, keys, config, wait, caller))
        entries = [entry if entry is not None else fresh[key] for key, entry in zip(keys, cached, strict=True)]
        out = [Encoded((), e.n_tokens, e.truncated) for e in entries]
        return out, np.stack([e.vector for e in entries]) if entries else np.empty((0, self.embedder.dim(config)), np.float32)

    async def _embed_owned(self, todo: list[int], texts: list[str], response_chars: list[int | None], keys: list[str],
                           config: EmbeddingConfig, wait: bool, caller: str | None = None) -> dict[str, CachedEmbedding]:
        """Embed items no other request is embedding, announcing each so concurrent duplicates wait for it.

        Waiters get None when this request fails or is cancelled, and then embed the item themselves."""
        loop = asyncio.get_running_loop()
        announced: dict[str, asyncio.Future[CachedEmbedding | None]] = {keys[i]: loop.create_future() for i in todo}
        self._inflight.update(announced)
        fresh: dict[str, CachedEmbedding] = {}
        try:
            fresh = await self._embed_uncached(todo, texts, response_chars, keys, config, wait, caller)
        finally:
            for key, future in announced.items():
                future.set_result(fresh.get(key))
                if self._inflight.get(key) is future:
                    del self._inflight[key]
        return fresh

    async def _embed_uncached(self, todo: list[int], texts: list[str], response_chars: list[int | None], keys: list[str],
                              config: EmbeddingConfig, wait: bool, caller: str | None = None) -> dict[str, CachedEmbedding]:
        """Tokenize and run items through the batcher, then cache them."""
        if not todo:
            return {}
        start = time.perf_counter()
        if not wait:
            try:
                self.batcher.check_room(len(todo), caller)  # an overloaded queue refuses before tokenizing (a cheap 429)
            except QueueFull:
                metrics.QUEUE_FULL.inc()
                raise
        encoded = await asyncio.to_thread(self.embedder.encode, [texts[i] for i in todo], config, [response_chars[i] for i in todo])
        metrics.TOKENIZE_SECONDS.observe(time.perf_counter() - start)
        try:
            rows = await self.batcher.submit([(e, config) for e in encoded], [len(e.input_ids) for e in encoded], key=config, wait=wait,
                                             caller=caller)
        except QueueFull:
            metrics.QUEUE_FULL.inc()
            raise
        finally:
            metrics.QUEUE_DEPTH.set(self.batcher.queue_depth)
        fresh = {keys[i]: CachedEmbedding(row, e.n_tokens, e.truncated) for i, e, row in zip(todo, encoded, rows, strict=True)}
        await self.cache.put_many(fresh)
        return fresh

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
    def _record_version(self, snapshot: ActiveSubspace) -> None:
        metrics.ACTIVE_VERSION.labels(snapshot.manifest.name).set(int(snapshot.manifest.version[1:]))

    def _require_fleet(self) -> Fleet | None:
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
        fleet = self._require_fleet()
        if fleet is not None:
            try:
                await fleet.set_active(version)
            except KeyError as err:
                raise ArtifactError(err.args[0]) from None
            except FleetUnavailable as err:
                raise RegistryUnavailable(str(err)) from None
        return await self._adopt(version)

    async def _adopt(self, version: str) -> ActiveSubspace:
        """Make ``version`` active here (installing it from Redis if this disk lacks it)."""
        async with self._adopt_lock:
            current = self.registry.current
            if current is not None and current.manifest.version == version:
                return current
            if version not in await asyncio.to_thread(self.registry.versions):
                await self._install_from_fleet(version)
            snapshot = await asyncio.to_thread(self.registry.activate, version)
            self._record_version(snapshot)
            self.ready = True
            log.info("active subspace is now %s/%s", snapshot.manifest.name, version)
            return snapshot

    # ----------------------------------------------------------------------------- fleet sync
    def _set_fleet_online(self, online: bool) -> None:
        if online != self.fleet_online:
            log.log(logging.INFO if online else logging.WARNING, "Redis %s", "connected" if online else "unreachable: degraded")
        self.fleet_online = online
        self.cache.redis_online = online
        metrics.FLEET_ONLINE.set(int(online))

    async def _reconcile(self) -> None:
        """On (re)connection: flush job states written during an outage, publish local versions Redis
        lacks (a first start, or a Redis that lost its data), then follow the fleet's active version."""
        assert self.fleet is not None
        for job_id, job in list(self._pending_jobs.items()):
            await self.fleet.put_job(job)
            self._pending_jobs.pop(job_id, None)
        published = set(await self.fleet.versions())
        for version in await asyncio.to_thread(self.registry.versions):
            if version not in published:
                try:
                    await self.fleet.seed(version, await asyncio.to_thread(self.registry.files, version))
                except VersionConflict as err:
                    log.error("not publishing local version: %s", err)
        active = await self.fleet.active()
        current = self.registry.current
        if active is None and current is not None:
            await self.fleet.seed_active(current.manifest.version)
            active = await self.fleet.active()
        if active is not None:
            try:
                await self._adopt(active)
            except ArtifactError as err:  # e.g. fitted on another model: keep serving what we have
                log.error("cannot adopt the fleet's active version %s: %s", active, err)

    async def _fleet_loop(self) -> None:
        """Follow the fleet: pub/sub events, a periodic pointer check as the fallback, reconnection."""
        assert self.fleet is not None
        backoff = 0.1
        while True:
            try:
                if not self.fleet_online:
                    await self.fleet.ping()
                    await self._reconcile()
                    self._set_fleet_online(True)
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
                if self.fleet_online:
                    log.warning("%s", err)
                self._set_fleet_online(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # the follower must outlive any one bad event (logged: not a blind except)
                log.exception("fleet sync failed; retrying")
                self._set_fleet_online(False)
                await asyncio.sleep(1.0)

    async def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("name") == self.registry.name:
            await self._follow_pointer()

    async def _poll_active(self) -> None:
        while True:
            await self._follow_pointer()
            await asyncio.sleep(self.settings.redis_poll_s)

    async def _follow_pointer(self) -> None:
        assert self.fleet is not None
        active = await self.fleet.active()
        current = self.registry.current
        if active is not None and (current is None or current.manifest.version != active):
            try:
                await self._adopt(active)
            except ArtifactError as err:
                log.error("cannot adopt the fleet's active version %s: %s", active, err)

    # ----------------------------------------------------------------------------- refit jobs
    async def job(self, job_id: str) -> dict[str, Any] | None:
        """A job's state as the fleet sees it (any replica's job), else this replica's."""
        if self.fleet is not None and self.fleet_online:
            try:
                found = await self.fleet.get_job(job_id)
                if found is not None:
                    return found
            except FleetUnavailable:
                pass
        return self.jobs.get(job_id)

    async def start_refit(self, upload: Path, options: FitOptions, activate: Activation = "auto", strict: bool = False) -> dict[str, Any]:
        """Start a refit job in a thread; 409 (RefitInProgress) while another one runs here or in the fleet."""
        if not self._refit_lock.acquire(blocking=False):
            upload.unlink(missing_ok=True)
            raise RefitInProgress(f"a refit of subspace {self.registry.name!r} is already running")
        job = self.jobs.create(self.registry.name, {**_options_dict(options), "activate": activate, "strict": strict})
        try:
            lease = None
            fleet = self._require_fleet()
            if fleet is not None:
                try:
                    lease = await fleet.acquire(job["job_id"])
                except RefitLocked as err:
                    raise RefitInProgress(str(err)) from None
                except FleetUnavailable as err:
                    raise RegistryUnavailable(str(err)) from None
                self.jobs.update(job["job_id"], replica=self.settings.replica_id, lease=lease.value)
                updated = self.jobs.get(job["job_id"])
                assert updated is not None  # created above; only the except below deletes it
                job = updated
                await self._push_job(job["job_id"])
        except BaseException:
            self.jobs.delete(job["job_id"])  # never started: no job to report
            upload.unlink(missing_ok=True)
            self._refit_lock.release()
            raise
        stop = threading.Event()
        if lease is not None:
            asyncio.get_running_loop().create_task(self._keep_lease(lease, stop))
        thread = threading.Thread(target=self._run_refit, args=(job["job_id"], upload, options, activate, strict, lease, stop),
                                  name=f"refit-{job['job_id'][:8]}", daemon=True)
        thread.start()
        return job

    async def _keep_lease(self, lease: RefitLease, stop: threading.Event) -> None:
        """Renew the fleet lock while the job runs; through an outage it keeps trying (publication is fenced)."""
        assert self.fleet is not None
        while not stop.is_set():
            await asyncio.sleep(self.settings.refit_lock_ttl_s / 3)
            if stop.is_set():
                break
            try:
                if not await self.fleet.renew(lease):
                    log.warning("refit %s: lock lapsed; publication will check the fence", lease.job_id)
            except FleetUnavailable:
                pass

    async def _push_job(self, job_id: str) -> None:
        """Write a job's state to Redis; during an outage keep it for the reconnection."""
        job = self.jobs.get(job_id)
        if self.fleet is None or job is None:
            return
        try:
            await self.fleet.put_job(job)
            self._pending_jobs.pop(job_id, None)
        except FleetUnavailable:
            self._pending_jobs[job_id] = job

    def _on_loop(self, coro: Any) -> Any:
        """Run a coroutine on the service's loop from a worker thread and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _update_job(self, job_id: str, **fields: Any) -> None:
        self.jobs.update(job_id, **fields)
        if self.fleet is not None:
            self._on_loop(self._push_job(job_id))

    def _embed_from_thread(self, items: Sequence[Item], config: EmbeddingConfig) -> tuple[list[Encoded], np.ndarray]:
        """The refit's embed function: shares the inference worker with live traffic, backing off on 429."""
        while True:
            try:
                return self._on_loop(self.embed(items, config))
            except QueueFull as err:
                time.sleep(min(err.retry_after_s, 1.0))

    def _until_published(self, step: Any) -> Any:
        """Retry a fleet step through a Redis outage (a fenced lease keeps it safe); other errors propagate."""
        while True:
            try:
                return self._on_loop(step())
            except FleetUnavailable as err:
                log.warning("refit waits for Redis: %s", err)
                time.sleep(0.5)

    def _run_refit(self, job_id: str, upload: Path, options: FitOptions, activation: Activation, strict: bool,
                   lease: RefitLease | None, stop: threading.Event) -> None:
        self._update_job(job_id, status="running")
        done = 0
        last_push = 0.0

        def progress(n: int) -> None:
            nonlocal done, last_push
            done += n
            self.jobs.update(job_id, progress={"lines": done})
            if self.fleet is not None and time.monotonic() - last_push > 1.0:  # progress to Redis at most 1/s
                last_push = time.monotonic()
                self._on_loop(self._push_job(job_id))

        try:
            current = self.registry.current
            prior = None if current is None else (current.subspace, current.manifest)
            with upload.open("rb") as fh:
                result = fit_lines(self.embedder, read_lines(fh), options, name=self.registry.name,
                                   calibration_digest=file_digest(upload), calibration_path="upload",
                                   progress=progress, embed=self._embed_from_thread, strict=strict, prior=prior)
            refit = result.manifest.refit or {}
            activate, held = decide_activation(
                activation, refit.get("comparison"), has_active=prior is not None, labelled=result.labels is not None
                or bool(refit.get("upload", {}).get("labelled")), bounds=GuardBounds(**self.settings.guard_bounds()))
            if refit:
                refit["activation"] = {"requested": activation, "activated": activate, "held": held}
            if lease is None:
                saved = self.registry.publish(result.subspace, result.manifest, activate=activate)
            else:
                fleet = self.fleet
                assert fleet is not None
                # Redis first, then disks: a version exists on a disk only once the fleet has it, so a
                # crash or a lost lock can never leave a local version that other replicas lack.
                version = self._until_published(lambda: fleet.next_version(self.registry.versions()))
                files = self.registry.render(result.subspace, result.manifest, version)
                self._until_published(lambda: fleet.publish(lease, version, files, activate=activate))
                self.registry.install(version, files)
                saved = result.manifest
                if activate:
                    self._on_loop(self._adopt(saved.version))
            if activate and lease is None:
                current = self.registry.current
                assert current is not None  # publish(activate=True) above made the new version current
                self._record_version(current)
                self.ready = True
            self._update_job(job_id, status="succeeded", version=saved.version, activated=activate, held=held or None,
                             refit=saved.refit, quality=saved.quality.get("calibration"), rejected=saved.calibration["rejected"],
                             finished_at=time.time())
            metrics.REFITS.labels("succeeded").inc()
            log.info("refit %s published %s/%s (active=%s)", job_id, saved.name, saved.version, activate)
        except Exception as err:  # a failed job is reported (and logged), not raised into a dead thread
            log.exception("refit %s failed", job_id)
            self._update_job(job_id, status="failed", error=str(err), finished_at=time.time())
            metrics.REFITS.labels("failed").inc()
        finally:
            stop.set()
            upload.unlink(missing_ok=True)
            if lease is not None:
                fleet = self.fleet
                assert fleet is not None
                try:
                    self._on_loop(fleet.release(lease))
                except FleetUnavailable:
                    pass  # it expires by itself
            self._refit_lock.release()


def _options_dict(options: FitOptions) -> dict[str, Any]:
    return {"embedding": options.embedding.as_dict(), "method": options.method, "k": options.k, "center": options.center,
            "standardize": options.standardize, "shrinkage": options.shrinkage, "balance": options.balance,
            "nuisance": options.nuisance, "cross_fit": options.cross_fit, "mode": options.mode,
            "labelled_weight": options.labelled_weight, "pseudo_weight": options.pseudo_weight,
            "policy": options.policy.as_dict() if options.policy else "auto"}
