"""A replica whose Redis is down at start: it serves its local version (degraded), then joins by itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.config import Settings
from app.core.embedding import Embedder
from app.core.items import parse_item
from app.serving.errors import RegistryUnavailable
from app.serving.service import ScoringService
from tests.support import RedisServer, install_default_v1


def test_starts_degraded_without_redis_and_joins_when_it_appears(embedder: Embedder, tmp_path: Path) -> None:
    models = tmp_path / "models"
    install_default_v1(models)
    redis = RedisServer(tmp_path / "redis")  # not started yet: its port refuses connections
    settings = Settings(redis_url=redis.url, models_dir=models, redis_poll_s=0.2, redis_timeout_s=0.5, replica_id="solo")
    service = ScoringService(settings, embedder)
    item = parse_item({"text": "How do I repot a cactus?"})

    async def run() -> None:
        await service.start()
        try:
            assert service.ready and service.health == "degraded" and service.subspaces.current.manifest.version == "v1"
            scored = await service.score([item], service.snapshot(), None)  # scoring goes on
            assert scored[0].verdict == "keep"
            try:
                await service.subspaces.activate("v1")
                raise AssertionError("an activation without Redis must be refused")
            except RegistryUnavailable as err:
                assert "Redis is unreachable" in str(err)
            redis.start()
            for _ in range(100):
                if service.health == "ready":
                    break
                await asyncio.sleep(0.1)
            assert service.health == "ready"
            client = redis.client()
            assert client.get("saft:{default}:active") == b"v1"  # it published what its disk had
            assert client.zrange("saft:{default}:versions", 0, -1) == [b"v1"]
            again = await service.score([item], service.snapshot(), None)
            assert again[0].score == scored[0].score  # from the cache, the same vector
            versions = await service.subspaces.list()
            assert versions == ["v1"]
        finally:
            await service.stop()
            redis.stop()

    asyncio.run(run())
