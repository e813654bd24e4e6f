"""Refit jobs of a running service: one at a time per subspace (per fleet, under a Redis lease), run in a thread that
shares the inference worker with live traffic, their states kept here and, in a fleet, in Redis.

Owns: ``JobStore`` (this replica's job states), ``RefitJobs`` (start, run, lease renewal, publication, the states
written during a Redis outage until the follower flushes them). Must not: know HTTP or the facade; it is given
what it uses (the versions, the embedder for tokenizing, an embed function that shares the worker, the settings).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app import metrics
from app.config import Settings
from app.core.anchoring import Activation, GuardBounds, decide_activation
from app.core.embedding import Embedder, EmbeddingConfig, Encoded
from app.core.items import Item
from app.core.pipeline import FitOptions, file_digest, fit_lines, read_lines
from app.serving.batching import QueueFull
from app.serving.errors import RefitInProgress, RegistryUnavailable
from app.serving.versions import SubspaceVersions
from app.store.fleet import FleetUnavailable, RefitLease, RefitLocked

EmbedFn = Callable[[Sequence[Item], EmbeddingConfig], Awaitable[tuple[list[Encoded], np.ndarray]]]

log = logging.getLogger(__name__)


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


class RefitJobs:
    """The refit jobs of one service (see the module docstring)."""

    def __init__(self, versions: SubspaceVersions, embedder: Embedder, embed: EmbedFn, settings: Settings) -> None:
        self.versions = versions
        self.registry = versions.registry
        self.embedder = embedder
        self.embed = embed  # on the loop: through the cache and the batcher, like live traffic
        self.settings = settings
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop jobs were started on, for their threads
        self.jobs = JobStore()
        self.pending: dict[str, dict[str, Any]] = {}  # job states not yet in Redis (written during an outage)
        self._lock = threading.Lock()

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """A job's state as the fleet sees it (any replica's job), else this replica's."""
        if self.versions.fleet is not None and self.versions.fleet_online:
            try:
                found = await self.versions.fleet.get_job(job_id)
                if found is not None:
                    return found
            except FleetUnavailable:
                pass
        return self.jobs.get(job_id)

    async def start(self, upload: Path, options: FitOptions, activate: Activation = "auto", strict: bool = False) -> dict[str, Any]:
        """Start a refit job in a thread; 409 (RefitInProgress) while another one runs here or in the fleet."""
        self.loop = asyncio.get_running_loop()
        if not self._lock.acquire(blocking=False):
            upload.unlink(missing_ok=True)
            raise RefitInProgress(f"a refit of subspace {self.registry.name!r} is already running")
        job = self.jobs.create(self.registry.name, {**_options_dict(options), "activate": activate, "strict": strict})
        try:
            lease = None
            fleet = self.versions.require_fleet()
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
            self._lock.release()
            raise
        stop = threading.Event()
        if lease is not None:
            asyncio.get_running_loop().create_task(self._keep_lease(lease, stop))
        thread = threading.Thread(target=self._run, args=(job["job_id"], upload, options, activate, strict, lease, stop),
                                  name=f"refit-{job['job_id'][:8]}", daemon=True)
        thread.start()
        return job

    async def _keep_lease(self, lease: RefitLease, stop: threading.Event) -> None:
        """Renew the fleet lock while the job runs; through an outage it keeps trying (publication is fenced)."""
        assert self.versions.fleet is not None
        while not stop.is_set():
            await asyncio.sleep(self.settings.refit_lock_ttl_s / 3)
            if stop.is_set():
                break
            try:
                if not await self.versions.fleet.renew(lease):
                    log.warning("refit %s: lock lapsed; publication will check the fence", lease.job_id)
            except FleetUnavailable:
                pass

    async def _push_job(self, job_id: str) -> None:
        """Write a job's state to Redis; during an outage keep it for the reconnection."""
        job = self.jobs.get(job_id)
        if self.versions.fleet is None or job is None:
            return
        try:
            await self.versions.fleet.put_job(job)
            self.pending.pop(job_id, None)
        except FleetUnavailable:
            self.pending[job_id] = job

    def _on_loop(self, coro: Any) -> Any:
        """Run a coroutine on the service's loop from a worker thread and wait for it."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _update_job(self, job_id: str, **fields: Any) -> None:
        self.jobs.update(job_id, **fields)
        if self.versions.fleet is not None:
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

    def _run(self, job_id: str, upload: Path, options: FitOptions, activation: Activation, strict: bool,
                   lease: RefitLease | None, stop: threading.Event) -> None:
        self._update_job(job_id, status="running")
        done = 0
        last_push = 0.0

        def progress(n: int) -> None:
            nonlocal done, last_push
            done += n
            self.jobs.update(job_id, progress={"lines": done})
            if self.versions.fleet is not None and time.monotonic() - last_push > 1.0:  # progress to Redis at most 1/s
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
                fleet = self.versions.fleet
                assert fleet is not None
                # Redis first, then disks: a version exists on a disk only once the fleet has it, so a
                # crash or a lost lock can never leave a local version that other replicas lack.
                version = self._until_published(lambda: fleet.next_version(self.registry.versions()))
                files = self.registry.render(result.subspace, result.manifest, version)
                self._until_published(lambda: fleet.publish(lease, version, files, activate=activate))
                self.registry.install(version, files)
                saved = result.manifest
                if activate:
                    self._on_loop(self.versions.adopt(saved.version))
            if activate and lease is None:
                current = self.registry.current
                assert current is not None  # publish(activate=True) above made the new version current
                self.versions.record(current)
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
                fleet = self.versions.fleet
                assert fleet is not None
                try:
                    self._on_loop(fleet.release(lease))
                except FleetUnavailable:
                    pass  # it expires by itself
            self._lock.release()


def _options_dict(options: FitOptions) -> dict[str, Any]:
    return {"embedding": options.embedding.as_dict(), "method": options.method, "k": options.k, "center": options.center,
            "standardize": options.standardize, "shrinkage": options.shrinkage, "balance": options.balance,
            "nuisance": options.nuisance, "cross_fit": options.cross_fit, "mode": options.mode,
            "labelled_weight": options.labelled_weight, "pseudo_weight": options.pseudo_weight,
            "policy": options.policy.as_dict() if options.policy else "auto"}
