"""Requests that embed the same inputs at the same time share one forward pass (the real model, in-process)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from app.config import PROJECT_ROOT, Settings
from app.core.embedding import Embedder
from app.core.items import Item, parse_item
from app.serving.service import ScoringService


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _items(dev_rows: list[dict], n: int) -> list[Item]:
    """Long pairs, so a forward pass lasts long enough for the second request to find it in flight."""
    pairs = sorted((r for r in dev_rows if r["kind"] == "pair"), key=lambda r: -len(r["response"]))
    return [parse_item({"prompt": r["prompt"], "response": r["response"]}) for r in pairs[:n]]


@pytest.fixture
def service(embedder: Embedder, tmp_path: Path) -> ScoringService:
    shutil.copytree(PROJECT_ROOT / "models" / "default", tmp_path / "models" / "default")
    return ScoringService(Settings(models_dir=tmp_path / "models"), embedder)


def test_concurrent_duplicates_are_embedded_once(service: ScoringService, dev_rows: list[dict]) -> None:
    items = _items(dev_rows, 4)

    async def run() -> None:
        await service.start()
        try:
            snapshot = service.snapshot()
            misses, inflight = _counter("saft_cache_misses_total"), _counter("saft_cache_hits_total", tier="inflight")
            results = await asyncio.gather(*(service.score(items, snapshot, None) for _ in range(3)))
            assert _counter("saft_cache_misses_total") - misses == len(items)  # each input through the model once
            assert _counter("saft_cache_hits_total", tier="inflight") - inflight == 2 * len(items)
            assert [[r.score for r in res] for res in results[1:]] == [[r.score for r in results[0]]] * 2
            assert not service.embeddings.inflight  # nothing left announced
        finally:
            await service.stop()

    asyncio.run(run())


def test_a_cancelled_request_does_not_fail_the_one_waiting_for_it(service: ScoringService, dev_rows: list[dict]) -> None:
    items = _items(dev_rows, 6)

    async def run() -> None:
        await service.start()
        try:
            snapshot = service.snapshot()
            owner = asyncio.create_task(service.score(items, snapshot, None))
            while not service.embeddings.inflight:
                await asyncio.sleep(0.001)
            inflight = _counter("saft_cache_hits_total", tier="inflight")
            waiter = asyncio.create_task(service.score(items, snapshot, None))
            while _counter("saft_cache_hits_total", tier="inflight") - inflight < len(items):
                assert not owner.done(), "the owner finished before the waiter found its inputs in flight"
                await asyncio.sleep(0.001)
            misses = _counter("saft_cache_misses_total")
            owner.cancel()  # a client that went away mid-request
            scored = await waiter
            assert len(scored) == len(items) and owner.cancelled()
            assert not service.embeddings.inflight
            service.cache._local.clear()
            expected = await service.score(items, snapshot, None)  # the same inputs, embedded afresh
            assert [r.score for r in scored] == pytest.approx([r.score for r in expected], rel=1e-5)
            assert _counter("saft_cache_misses_total") - misses == 2 * len(items)  # the waiter's own run, then the fresh one
        finally:
            await service.stop()

    asyncio.run(run())
