"""Fleet state in a real Redis: atomic immutable publication, the fenced refit lock, jobs, the shared cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from app.core.embedding import EmbeddingConfig, cache_key
from app.serving.cache import CachedEmbedding, EmbeddingCache
from app.store.fleet import MANIFEST, TENSORS, Fleet, FleetUnavailable, LockLost, RefitLocked, VersionConflict
from tests.support import RedisServer


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def make_fleet(url: str, replica: str = "r1", lock_ttl_s: float = 5.0, name: str = "default") -> Fleet:
    return Fleet(url, prefix="t", name=name, replica_id=replica, timeout_s=0.5, lock_ttl_s=lock_ttl_s, job_ttl_s=3600)


def files(tag: str) -> dict[str, bytes]:
    return {MANIFEST: f'{{"v": "{tag}"}}'.encode(), TENSORS: tag.encode() * 10}


def test_publish_is_atomic_immutable_and_announced(redis_server: RedisServer) -> None:
    async def run() -> None:
        a, b = make_fleet(redis_server.url, "a"), make_fleet(redis_server.url, "b")
        events: list[dict] = []
        listener = asyncio.create_task(b.listen(lambda e: asyncio.sleep(0, events.append(e))))
        await asyncio.sleep(0.3)
        lease = await a.acquire("job1")
        version = await a.next_version(["v1", "v3"])
        assert version == "v4"  # above local versions too: no replica ever reuses a number
        await a.publish(lease, version, files("x"), activate=True)
        assert await b.versions() == ["v4"] and await b.active() == "v4"
        assert await b.fetch("v4") == files("x")
        assert await b.fetch("v5") is None
        with pytest.raises(KeyError, match="no published version 'v5'"):
            await b.set_active("v5")  # only a published version can become active
        assert await b.active() == "v4"
        await a.publish(lease, version, files("x"), activate=True)  # a retried publication is harmless
        with pytest.raises(VersionConflict):
            await a.publish(lease, version, files("other"), activate=False)
        with pytest.raises(VersionConflict):
            await b.seed("v4", files("other"))
        assert await b.fetch("v4") == files("x")  # unchanged
        for _ in range(50):
            if len(events) >= 2:
                break
            await asyncio.sleep(0.05)
        assert [e["version"] for e in events] == ["v4", "v4"] and events[0]["replica"] == "a"
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await a.release(lease)
        await a.close()
        await b.close()

    asyncio.run(run())


def test_refit_lock_is_exclusive_expires_and_fences(redis_server: RedisServer) -> None:
    async def run() -> None:
        a, b = make_fleet(redis_server.url, "a", lock_ttl_s=0.4), make_fleet(redis_server.url, "b", lock_ttl_s=0.4)
        lease_a = await a.acquire("ja")
        with pytest.raises(RefitLocked, match="ja"):
            await b.acquire("jb")
        assert await a.renew(lease_a)
        await asyncio.sleep(0.6)  # a "crashed": its lock expires by itself
        # Lapsed but unclaimed: a may still publish (e.g. it was cut off by a Redis outage).
        await a.publish(lease_a, "v1", files("a1"), activate=True)
        lease_b = await b.acquire("jb")
        assert lease_b.token > lease_a.token
        with pytest.raises(LockLost):  # a newer holder exists: the stale one is fenced out
            await a.publish(lease_a, "v2", files("a2"), activate=True)
        assert await b.versions() == ["v1"] and await b.active() == "v1"
        assert not await a.renew(lease_a)
        await a.release(lease_a)  # releasing someone else's lock does nothing
        assert await b.holds(lease_b.value)
        await b.release(lease_b)
        assert not await b.holds(lease_b.value)
        await a.close()
        await b.close()

    asyncio.run(run())


def test_a_job_whose_replica_died_reads_failed(redis_server: RedisServer) -> None:
    async def run() -> None:
        a, b = make_fleet(redis_server.url, "a", lock_ttl_s=0.3), make_fleet(redis_server.url, "b")
        lease = await a.acquire("j1")
        job = {"job_id": "j1", "name": "default", "status": "running", "lease": lease.value, "replica": "a",
               "finished_at": None, "error": None}
        await a.put_job(job)
        assert (await b.get_job("j1"))["status"] == "running"
        await asyncio.sleep(0.5)  # no renewal: the replica is gone
        seen = await b.get_job("j1")
        assert seen["status"] == "failed" and "replica 'a' stopped" in seen["error"]
        assert await b.get_job("nope") is None
        await a.put_job({**job, "status": "succeeded", "version": "v1"})
        assert (await b.get_job("j1"))["status"] == "succeeded"
        await a.close()
        await b.close()

    asyncio.run(run())


def test_an_outage_is_reported_as_unavailable_and_passes(redis_server: RedisServer) -> None:
    async def run() -> None:
        fleet = make_fleet(redis_server.url)
        await fleet.seed("v1", files("one"))
        assert await fleet.seed_active("v1") and not await fleet.seed_active("v2")
        redis_server.kill()
        with pytest.raises(FleetUnavailable, match="Redis unreachable"):
            await fleet.active()
        redis_server.start()  # append-only file: the data survives a crash
        assert await fleet.active() == "v1" and await fleet.fetch("v1") == files("one")
        await fleet.close()

    asyncio.run(run())


def test_cache_key_covers_everything_that_changes_the_embedding() -> None:
    from app.core.numeric_path import REFERENCE_PATH, NumericPath

    base = EmbeddingConfig(layers=(20,), pooling="mean")
    key = cache_key("w1", base, "hello")
    variants = [
        cache_key("w2", base, "hello"),
        cache_key("w1", base, "hello!"),
        cache_key("w1", EmbeddingConfig(layers=(21,), pooling="mean"), "hello"),
        cache_key("w1", EmbeddingConfig(layers=(20,), pooling="last"), "hello"),
        cache_key("w1", EmbeddingConfig(layers=(20,), pooling="mean", template="plain"), "hello"),
        cache_key("w1", EmbeddingConfig(layers=(20,), pooling="mean", max_length=128), "hello"),
        cache_key("w1", EmbeddingConfig(layers=(20,), pooling="mean", truncation_side="right"), "hello"),
        cache_key("w1", base, "hello", NumericPath("cuda", "bfloat16", "sdpa")),
        cache_key("w1", base, "hello", NumericPath("cpu", "float32", "sdpa", compiled=True)),
    ]
    assert key == cache_key("w1", base, "hello") and len({key, *variants}) == len(variants) + 1
    assert cache_key("w1", base, "hello", REFERENCE_PATH) == key  # keys stored before paths were recorded stay valid


def entry(seed: int, dim: int = 64) -> CachedEmbedding:
    return CachedEmbedding(np.random.default_rng(seed).standard_normal(dim).astype(np.float32), 10 + seed, seed % 2 == 0)


def test_local_cache_is_bounded_in_bytes_and_expires() -> None:
    async def run() -> None:
        cache = EmbeddingCache(max_bytes=3 * (64 * 4 + 200), ttl_s=1)
        await cache.put_many({f"k{i}": entry(i) for i in range(5)})
        found, local_hits, _ = await cache.get_many([f"k{i}" for i in range(5)])
        assert local_hits == 3 and cache.local_bytes <= 3 * (64 * 4 + 200)
        assert [f is None for f in found] == [True, True, False, False, False]  # least recently used went first
        np.testing.assert_array_equal(found[4].vector, entry(4).vector)
        assert (found[4].n_tokens, found[4].truncated) == (14, True)
        await asyncio.sleep(1.2)
        assert (await cache.get_many(["k4"]))[1] == 0  # expired

    asyncio.run(run())


def test_redis_tier_is_shared_and_its_failure_is_a_miss(redis_server: RedisServer) -> None:
    async def run() -> None:
        a = make_fleet(redis_server.url, "a")
        b = make_fleet(redis_server.url, "b")
        cache_a = EmbeddingCache(2**20, 60, redis=a.redis, prefix="t")
        cache_b = EmbeddingCache(2**20, 60, redis=b.redis, prefix="t")
        await cache_a.put_many({"k1": entry(1)})
        found, local_hits, redis_hits = await cache_b.get_many(["k1", "k2"])
        assert (local_hits, redis_hits) == (0, 1) and found[1] is None
        np.testing.assert_array_equal(found[0].vector, entry(1).vector)
        assert (await cache_b.get_many(["k1"]))[1] == 1  # now also local
        ttl = redis_server.client().ttl("t:emb:k1")
        assert 0 < ttl <= 60  # every cache entry expires (and is evictable under volatile-lru)
        redis_server.kill()
        start = time.monotonic()
        found, _, redis_hits = await cache_b.get_many(["k2"])
        assert found == [None] and redis_hits == 0 and time.monotonic() - start < 5
        await cache_b.put_many({"k3": entry(3)})  # kept locally, no error
        assert (await cache_b.get_many(["k3"]))[1] == 1
        await a.close()
        await b.close()

    asyncio.run(run())


def test_events_carry_json(redis_server: RedisServer) -> None:
    """The announcement is plain JSON any tool can read (e.g. redis-cli SUBSCRIBE)."""
    fleet = make_fleet(redis_server.url)
    assert orjson.loads(fleet._event("v3", "activate")) == {"name": "default", "version": "v3", "event": "activate", "replica": "r1"}
