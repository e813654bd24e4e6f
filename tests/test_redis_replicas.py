"""Two real service processes and one real Redis act as one service.

Refit through one replica, the other serves the new version; roll back through the other, the first
follows; Redis killed mid-load and restarted (and once restarted empty): no failed scoring request,
both replicas converge; a replica killed (-9) during a refit: its job reads failed everywhere, no
partial version anywhere, the fleet can refit again. The shared cache serves one replica's
embeddings to the other.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import httpx
import pytest

from app.launcher import start_server, stop_server
from tests.support import RedisServer, install_default_v1, metric_value, wait_for, wait_job, write_jsonl

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer admin-secret"}
# activate=always: these tests follow a new version through the fleet; the refit guard has tests of its own.
REFIT = "/subspace/refit?layers=20&pooling=mean&max_length=256&policy=fpr:0.1&activate=always"


class Replica:
    def __init__(self, name: str, tmp: Path, redis_url: str) -> None:
        self.name = name
        self.models = tmp / name / "models"
        install_default_v1(self.models)
        self.log = tmp / f"{name}.log"
        self.env = {"SAFT_REDIS_URL": redis_url, "SAFT_MODELS_DIR": str(self.models), "SAFT_ADMIN_TOKEN": "admin-secret",
                    "SAFT_REPLICA_ID": name, "SAFT_REFIT_LOCK_TTL_S": "3", "SAFT_REDIS_POLL_S": "0.5",
                    "SAFT_REDIS_TIMEOUT_S": "0.5", "SAFT_LOG_LEVEL": "INFO"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> Replica:
        self.proc, self.url = start_server(self.env, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_server(self.proc)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(self.url + path, timeout=120, **kwargs)  # type: ignore[arg-type]

    def active(self) -> str:
        return self.get("/subspace").json()["version"]

    def ready(self) -> dict:
        return self.get("/readyz").json()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return metric_value(self.get("/metrics").text, name, labels)


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[tuple[RedisServer, Replica, Replica]]:
    redis = RedisServer(tmp_path / "redis").start()
    a, b = Replica("a", tmp_path, redis.url), Replica("b", tmp_path, redis.url)
    try:
        a.start()
        b.start()
        yield redis, a, b
    finally:
        a.stop()
        b.stop()
        redis.stop()


class Load:
    """Clients scoring through both replicas until stopped; every response is recorded."""

    def __init__(self, replicas: list[Replica], texts: list[str], clients: int = 4) -> None:
        self.replicas, self.texts = replicas, texts
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = i
            while not self._stop.is_set():
                replica = self.replicas[n % len(self.replicas)]
                body = {"items": [{"id": n, "text": self.texts[n % len(self.texts)] + f" #{n}"}]}
                try:
                    r = client.post(replica.url + "/score", json=body)
                    self.statuses.append(r.status_code)
                    if r.status_code == 200:
                        self.versions.add(r.json()["subspace"]["version"])
                    else:
                        self.errors.append(f"{replica.name}: {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as err:
                    self.errors.append(f"{replica.name}: {type(err).__name__}: {err}")
                n += len(self._threads)

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def test_two_replicas_follow_refit_rollback_and_survive_redis_outages(
    fleet: tuple[RedisServer, Replica, Replica], calibration_rows: list[dict], dev_rows: list[dict], tmp_path: Path
) -> None:
    redis, a, b = fleet
    # Both came up on the committed default; the first one published it to the empty Redis.
    assert a.active() == b.active() == "v1"
    assert a.ready()["redis"] == b.ready()["redis"] == "connected"
    r = redis.client()
    assert r.get("saft:{default}:active") == b"v1" and r.zrange("saft:{default}:versions", 0, -1) == [b"v1"]

    # Refit through A; B refuses a concurrent refit (one per name across the fleet) and sees A's job.
    calib = write_jsonl(tmp_path / "calib.jsonl", calibration_rows).read_bytes()
    job = a.post(REFIT, content=calib, headers=ADMIN)
    assert job.status_code == 202, job.text
    job_id = job.json()["job_id"]
    clash = b.post(REFIT, content=calib, headers=ADMIN)
    assert clash.status_code == 409 and job_id in clash.json()["error"]
    seen_from_b = b.get(f"/subspace/jobs/{job_id}").json()
    assert seen_from_b["replica"] == "a" and seen_from_b["status"] in ("queued", "running", "succeeded")
    state = wait_job(b.url, job_id, {})
    assert state["status"] == "succeeded" and state["version"] == "v2", state
    followed_s = wait_for(lambda: b.active() == "v2", 5, "B serves v2")
    item = {"items": [{"id": 1, "prompt": dev_rows[0]["prompt"], "response": dev_rows[0].get("response", "ok")}]}
    assert b.post("/score", json=item).json()["subspace"]["version"] == "v2"
    # B installed A's version on its own disk, byte for byte.
    for f in ("manifest.json", "subspace.safetensors"):
        assert (a.models / "default" / "v2" / f).read_bytes() == (b.models / "default" / "v2" / f).read_bytes()
    assert (b.models / "default" / "ACTIVE").read_text().strip() == "v2"

    # Roll back through B: A follows.
    assert b.post("/subspace/versions/v1/activate", headers=ADMIN).status_code == 200
    rollback_s = wait_for(lambda: a.active() == "v1", 5, "A follows the rollback to v1")
    assert b.get("/subspace/versions").json() == {"name": "default", "active": "v1", "versions": ["v1", "v2"]}

    # Kill Redis mid-load, then restart it: no scoring request fails, writes wait, both reconnect.
    texts = [row.get("prompt") or row.get("text") for row in dev_rows]
    with Load([a, b], texts) as load:
        time.sleep(2)
        redis.kill()
        wait_for(lambda: a.ready()["status"] == "degraded" and b.ready()["status"] == "degraded", 10, "both degraded")
        assert a.get("/readyz").status_code == 200  # still scoring: not taken out of the load balancer
        refused = a.post(REFIT, content=calib, headers=ADMIN)
        assert refused.status_code == 503 and "Redis" in refused.json()["error"]
        assert b.post("/subspace/versions/v2/activate", headers=ADMIN).status_code == 503
        time.sleep(2)
        redis.start()
        wait_for(lambda: a.ready()["status"] == b.ready()["status"] == "ready", 15, "both reconnected")
        time.sleep(1)
    assert load.errors == [] and len(load.statuses) > 10 and set(load.statuses) == {200}, load.errors[:5]
    assert load.versions == {"v1"}

    # Converged: a rollforward through A reaches B.
    assert a.post("/subspace/versions/v2/activate", headers=ADMIN).status_code == 200
    wait_for(lambda: b.active() == "v2", 5, "B follows v2 after the outage")

    # Redis restarted empty (lost its data): the replicas publish what they have again and agree.
    with Load([a, b], texts, clients=2) as load:
        redis.wipe()
        redis.start()
        wait_for(lambda: r.get("saft:{default}:active") == b"v2", 15, "the fleet state is re-seeded")
        time.sleep(1)
    assert load.errors == [] and set(load.statuses) == {200}, load.errors[:5]
    assert r.zrange("saft:{default}:versions", 0, -1) == [b"v1", b"v2"]
    assert a.active() == b.active() == "v2"
    print(f"\nB followed the refit in {followed_s:.2f}s, A followed the rollback in {rollback_s:.2f}s")


def test_shared_cache_and_a_replica_killed_during_refit(
    fleet: tuple[RedisServer, Replica, Replica], calibration_rows: list[dict], dev_rows: list[dict], tmp_path: Path
) -> None:
    redis, a, b = fleet
    items = [{"id": i, "prompt": row["prompt"], "response": row["response"]} if row.get("response")
             else {"id": i, "text": row.get("prompt") or row["text"]} for i, row in enumerate(dev_rows[:12])]
    items.append({**items[0], "id": "dup"})  # a duplicate inside the request is embedded once
    misses_before = a.metric("saft_cache_misses_total")
    first = a.post("/score", json={"items": items}).json()["results"]
    assert a.metric("saft_cache_misses_total") - misses_before == len(items) - 1
    assert a.metric("saft_cache_hits_total", {"tier": "request"}) >= 1
    again = a.post("/score", json={"items": items}).json()["results"]
    assert a.metric("saft_cache_misses_total") - misses_before == len(items) - 1  # nothing embedded twice
    from_b = b.post("/score", json={"items": items}).json()["results"]
    assert b.metric("saft_cache_hits_total", {"tier": "redis"}) >= len(items) - 1  # A's embeddings, through Redis
    for x, y, z in zip(first, again, from_b, strict=True):  # the same vectors (to BLAS rounding of the projection)
        assert x["score"] == pytest.approx(y["score"], rel=1e-9) == pytest.approx(z["score"], rel=1e-9)
        assert x["n_tokens"] == z["n_tokens"] and x["truncated"] == z["truncated"]
    assert first[0]["score"] == pytest.approx(first[-1]["score"], rel=1e-9)

    # kill -9 A during a refit: the job reads failed from B once A's lock expires; nothing partial anywhere.
    distinct = [{**row, "prompt": f"{row['prompt']} ({i})", "text": f"{row['text']} ({i})"}  # no cache hits: a long refit
                for i in range(8) for row in calibration_rows]
    big = write_jsonl(tmp_path / "big.jsonl", distinct).read_bytes()
    job_id = a.post(REFIT, content=big, headers=ADMIN).json()["job_id"]
    wait_for(lambda: b.get(f"/subspace/jobs/{job_id}").json()["progress"].get("lines", 0) > 0, 120, "refit under way")
    assert a.proc is not None
    a.proc.kill()
    a.proc.wait()
    state = wait_job(b.url, job_id, {}, timeout_s=30)
    assert state["status"] == "failed" and "stopped before the job finished" in state["error"]
    r = redis.client()
    assert r.zrange("saft:{default}:versions", 0, -1) == [b"v1"] and r.get("saft:{default}:active") == b"v1"
    assert not [k for k in r.keys("saft:{default}:version:v2*")]
    assert sorted(p.name for p in (a.models / "default").iterdir()) == ["ACTIVE", "v1"]  # no partial write on A's disk

    # The fleet can refit again (through B), and A restarts onto the fleet's new active version.
    job2 = b.post(REFIT, content=write_jsonl(tmp_path / "calib.jsonl", calibration_rows).read_bytes(), headers=ADMIN)
    assert job2.status_code == 202, job2.text
    assert wait_job(b.url, job2.json()["job_id"], {})["status"] == "succeeded"
    a.start()
    assert a.active() == "v2" and json.loads((a.models / "default" / "v2" / "manifest.json").read_text())["version"] == "v2"
