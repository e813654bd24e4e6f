"""The serving core: model + micro-batcher + subspace registry + refit jobs, without HTTP.

Routes call into ``ScoringService``; it never touches requests or responses. Model code runs only
in the batcher's worker thread (forward passes) or worker threads (tokenizing), never on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app import metrics
from app.batching import BatchStats, MicroBatcher, QueueFull
from app.config import Settings
from app.embedding import Embedder, EmbeddingConfig, Encoded
from app.items import Item
from app.pipeline import FitOptions, Scored, file_digest, fit_lines, read_lines, score_encoded
from app.registry import ActiveSubspace, SubspaceRegistry

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """No active subspace (or the model is still loading)."""


class RefitInProgress(RuntimeError):
    """A refit of this subspace is already running."""


class ItemTooLarge(ValueError):
    """An item longer than the configured character limit (refused, never cut silently)."""


def item_chars(item: Item) -> int:
    return sum(len(content) for _, content in item.turns)


class JobStore:
    """Refit job states in memory (one replica); the Redis store replaces it for a fleet."""

    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def create(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        job = {"job_id": uuid.uuid4().hex, "name": name, "status": "queued", "progress": {"lines": 0},
               "options": options, "version": None, "activated": False, "quality": None, "rejected": None, "error": None,
               "created_at": time.time(), "finished_at": None}
        with self._lock:
            self._jobs[job["job_id"]] = job
        return dict(job)

    def update(self, job_id: str, **fields: Any) -> None:
        with self._lock:
            self._jobs[job_id].update(fields)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else dict(job)


class ScoringService:
    """Everything the HTTP layer needs, built once in the app's lifespan."""

    def __init__(self, settings: Settings, embedder: Embedder) -> None:
        self.settings = settings
        self.embedder = embedder
        self.registry = SubspaceRegistry(settings.models_dir, settings.subspace_name, embedder)
        self.jobs = JobStore()
        self.batcher: MicroBatcher[Encoded, np.ndarray] = MicroBatcher(
            self._forward,
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            on_batch=self._on_batch,
        )
        self._refit_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = False

    # ----------------------------------------------------------------------------- lifecycle
    @classmethod
    def load(cls, settings: Settings) -> ScoringService:
        return cls(settings, Embedder.from_settings(settings))

    async def start(self) -> None:
        """TEI's order: (model loaded) → subspace → warm-up → batcher → ready."""
        self._loop = asyncio.get_running_loop()
        snapshot = await asyncio.to_thread(self.registry.load_active)
        if snapshot is not None:
            self._record_version(snapshot)
        await asyncio.to_thread(self._warm_up, snapshot)
        self.batcher.start()
        self.ready = snapshot is not None

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop(drain=True)

    def _warm_up(self, snapshot: ActiveSubspace | None) -> None:
        config = snapshot.manifest.embedding if snapshot else EmbeddingConfig()
        self.embedder.forward(self.embedder.encode(["warm-up"], config), config)

    # ----------------------------------------------------------------------------- scoring
    def _forward(self, batch: Sequence[tuple[Encoded, EmbeddingConfig]]) -> list[np.ndarray]:
        """Runs in the batcher's worker thread: one forward pass for one embedding config."""
        config = batch[0][1]
        return list(self.embedder.forward([enc for enc, _ in batch], config))

    def _on_batch(self, stats: BatchStats) -> None:
        metrics.BATCH_SIZE.observe(stats.size)
        metrics.BATCH_TOKENS.observe(stats.padded_tokens)
        metrics.INFERENCE_SECONDS.observe(stats.seconds)
        metrics.QUEUE_DEPTH.set(stats.queue_depth)

    def snapshot(self) -> ActiveSubspace:
        current = self.registry.current
        if current is None or not self.ready:
            raise NotReady("no active subspace yet: fit one (saft fit) or POST /subspace/refit")
        return current

    def check_size(self, item: Item, where: str = "item") -> None:
        chars = item_chars(item)
        if chars > self.settings.max_chars_per_item:
            raise ItemTooLarge(f"{where}: {chars} characters exceed the limit of {self.settings.max_chars_per_item} per item")

    async def embed(self, items: Sequence[Item], config: EmbeddingConfig) -> tuple[list[Encoded], np.ndarray]:
        """Tokenize off the loop, then wait for the shared inference worker."""
        start = time.perf_counter()
        encoded = await asyncio.to_thread(self.embedder.encode_items, items, config)
        metrics.TOKENIZE_SECONDS.observe(time.perf_counter() - start)
        try:
            rows = await self.batcher.submit([(e, config) for e in encoded], [len(e.input_ids) for e in encoded], key=config)
        except QueueFull:
            metrics.QUEUE_FULL.inc()
            raise
        finally:
            metrics.QUEUE_DEPTH.set(self.batcher.queue_depth)
        return encoded, np.stack(rows) if rows else np.empty((0, self.embedder.dim(config)), np.float32)

    async def score(self, items: Sequence[Item], snapshot: ActiveSubspace, threshold: float | None) -> list[Scored]:
        """Score items with one snapshot (one version for the whole request)."""
        encoded, vectors = await self.embed(items, snapshot.manifest.embedding)
        results = score_encoded(snapshot.subspace, snapshot.manifest, items, encoded, vectors, threshold)
        metrics.ITEMS_SCORED.inc(len(results))
        for r in results:
            metrics.VERDICTS.labels(r.verdict).inc()
        metrics.TRUNCATIONS.inc(sum(r.truncated for r in results))
        return results

    # ----------------------------------------------------------------------------- subspaces
    def _record_version(self, snapshot: ActiveSubspace) -> None:
        metrics.ACTIVE_VERSION.labels(snapshot.manifest.name).set(int(snapshot.manifest.version[1:]))

    async def activate(self, version: str) -> ActiveSubspace:
        snapshot = await asyncio.to_thread(self.registry.activate, version)
        self._record_version(snapshot)
        self.ready = True
        return snapshot

    def start_refit(self, upload: Path, options: FitOptions, activate: bool, strict: bool = False) -> dict[str, Any]:
        """Start a refit job in a thread; 409 (RefitInProgress) while another one runs."""
        if not self._refit_lock.acquire(blocking=False):
            upload.unlink(missing_ok=True)
            raise RefitInProgress(f"a refit of subspace {self.registry.name!r} is already running")
        job = self.jobs.create(self.registry.name, {**_options_dict(options), "activate": activate, "strict": strict})
        thread = threading.Thread(target=self._run_refit, args=(job["job_id"], upload, options, activate, strict),
                                  name=f"refit-{job['job_id'][:8]}", daemon=True)
        thread.start()
        return job

    def _embed_from_thread(self, items: Sequence[Item], config: EmbeddingConfig) -> tuple[list[Encoded], np.ndarray]:
        """The refit's embed function: shares the inference worker with live traffic, backing off on 429."""
        assert self._loop is not None
        while True:
            try:
                return asyncio.run_coroutine_threadsafe(self.embed(items, config), self._loop).result()
            except QueueFull as err:
                time.sleep(min(err.retry_after_s, 1.0))

    def _run_refit(self, job_id: str, upload: Path, options: FitOptions, activate: bool, strict: bool) -> None:
        self.jobs.update(job_id, status="running")
        done = 0

        def progress(n: int) -> None:
            nonlocal done
            done += n
            self.jobs.update(job_id, progress={"lines": done})

        try:
            with upload.open("rb") as fh:
                result = fit_lines(self.embedder, read_lines(fh), options, name=self.registry.name,
                                   calibration_digest=file_digest(upload), calibration_path="upload",
                                   progress=progress, embed=self._embed_from_thread, strict=strict)
            saved = self.registry.publish(result.subspace, result.manifest, activate=activate)
            if activate:
                self._record_version(self.registry.current)  # type: ignore[arg-type]
                self.ready = True
            self.jobs.update(job_id, status="succeeded", version=saved.version, activated=activate,
                             quality=saved.quality.get("calibration"), rejected=saved.calibration["rejected"],
                             finished_at=time.time())
            metrics.REFITS.labels("succeeded").inc()
            log.info("refit %s published %s/%s (active=%s)", job_id, saved.name, saved.version, activate)
        except Exception as err:  # noqa: BLE001 - a failed job is reported, not raised into a dead thread
            log.exception("refit %s failed", job_id)
            self.jobs.update(job_id, status="failed", error=str(err), finished_at=time.time())
            metrics.REFITS.labels("failed").inc()
        finally:
            upload.unlink(missing_ok=True)
            self._refit_lock.release()


def _options_dict(options: FitOptions) -> dict[str, Any]:
    return {"embedding": options.embedding.as_dict(), "method": options.method, "k": options.k, "center": options.center,
            "standardize": options.standardize, "shrinkage": options.shrinkage,
            "policy": options.policy.as_dict() if options.policy else "auto"}
