"""The state that replicas share through Redis: published versions, the active pointer, refit locks, jobs.

Owns the Redis key layout and every Redis call of the registry and the refit jobs; knows bytes and
JSON, not subspaces or HTTP. All keys of one subspace name share a hash tag (``{name}``) so the Lua
scripts stay valid on a Redis Cluster. Must not: know subspaces, manifests, HTTP or the serving layer (it imports
nothing from ``app``), or decide what to publish or activate (its callers in the service do).

Guarantees:
- a version is published all at once (one Lua script: both files, the version set, the pointer and
  the event) and never changes afterwards (a second publication with other bytes is refused);
- at most one refit per name across the fleet: a lock with an expiry, renewed while the job runs,
  and a fencing token checked at publication, so a replica that lost its lock (crash, pause,
  outage) cannot publish over a newer holder;
- a job whose replica died reads as failed once its lock has expired.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TENSORS = "subspace.safetensors"


class FleetUnavailable(RuntimeError):
    """Redis is configured but cannot be reached: fleet writes are refused rather than diverging."""


class RefitLocked(RuntimeError):
    """Another replica holds this subspace's refit lock."""


class LockLost(RuntimeError):
    """The refit lock expired and another replica took it: the result must not be published."""


class VersionConflict(RuntimeError):
    """A version number is already published with other content."""


@dataclass(frozen=True, slots=True)
class RefitLease:
    """A held refit lock: its value identifies the holder, its token fences stale holders out."""

    name: str
    job_id: str
    token: int
    value: str


# KEYS: lock, fence | ARGV: lease value, token. A holder may publish while it holds the lock, or when
# the lock lapsed (e.g. during a Redis outage) and nobody acquired it since (fence unchanged or wiped).
_FENCE_CHECK = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return 1 end
if holder then return 0 end
local fence = redis.call('GET', KEYS[2])
if (not fence) or fence == ARGV[2] then return 1 end
return 0
"""

_PUBLISH = (
    """
-- KEYS: lock, fence, manifest, tensors, versions, active | ARGV: lease, token, manifest, tensors,
-- version number, version, activate (0/1), channel, event
"""
    + "local function fenced()\n"
    + _FENCE_CHECK
    + """end
if fenced() == 0 then return redis.error_reply('LOCKLOST') end
local old = redis.call('GET', KEYS[3])
if old then
  if old ~= ARGV[3] or redis.call('GET', KEYS[4]) ~= ARGV[4] then return redis.error_reply('CONFLICT') end
else
  redis.call('SET', KEYS[3], ARGV[3])
  redis.call('SET', KEYS[4], ARGV[4])
  redis.call('ZADD', KEYS[5], tonumber(ARGV[5]), ARGV[6])
end
if ARGV[7] == '1' then
  redis.call('SET', KEYS[6], ARGV[6])
end
redis.call('PUBLISH', ARGV[8], ARGV[9])
return 1
"""
)

# KEYS: manifest, tensors, versions | ARGV: manifest, tensors, number, version — seeding (no lock):
# publish a version only where Redis has none of that number.
_SEED = """
local old = redis.call('GET', KEYS[1])
if old then
  if old ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then return redis.error_reply('CONFLICT') end
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[4])
return 1
"""

# KEYS: lock, fence | ARGV: holder suffix, ttl ms. The fence moves only when the lock is taken.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder then return {0, holder} end
local token = redis.call('INCR', KEYS[2])
local value = token .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', tonumber(ARGV[2]))
return {token, value}
"""

_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def _number(version: str) -> int:
    return int(version[1:])


class Fleet:
    """One subspace name's shared state in one Redis; every call raises ``FleetUnavailable`` on an outage."""

    def __init__(self, url: str, *, prefix: str, name: str, replica_id: str, timeout_s: float,
                 lock_ttl_s: float, job_ttl_s: int) -> None:
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.name = name
        self.replica_id = replica_id
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.job_ttl_s = job_ttl_s
        base = f"{prefix}:{{{name}}}"
        self.channel = f"{base}:events"
        self._keys = {
            "active": f"{base}:active",
            "versions": f"{base}:versions",
            "lock": f"{base}:refit-lock",
            "fence": f"{base}:refit-fence",
        }
        self._job_prefix = f"{base}:job:"
        self._version_prefix = f"{base}:version:"
        self._publish = self.redis.register_script(_PUBLISH)
        self._seed = self.redis.register_script(_SEED)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    def _file_key(self, version: str, file: str) -> str:
        return f"{self._version_prefix}{version}:{file}"

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except ResponseError:
            raise
        except (RedisError, OSError) as err:
            raise FleetUnavailable(f"Redis unreachable ({what}): {err}") from err

    async def close(self) -> None:
        await self.redis.aclose()

    # ----------------------------------------------------------------------------- versions
    async def ping(self) -> None:
        await self._call("ping", self.redis.ping)

    async def active(self) -> str | None:
        value = await self._call("active", lambda: self.redis.get(self._keys["active"]))
        return None if value is None else value.decode()

    async def versions(self) -> list[str]:
        values = await self._call("versions", lambda: self.redis.zrange(self._keys["versions"], 0, -1))
        return [v.decode() for v in values]

    async def fetch(self, version: str) -> dict[str, bytes] | None:
        """Both files of a published version, or None when Redis does not have it."""
        keys = [self._file_key(version, f) for f in (MANIFEST, TENSORS)]
        manifest, tensors = await self._call("fetch", lambda: self.redis.mget(keys))
        if manifest is None or tensors is None:
            return None
        return {MANIFEST: manifest, TENSORS: tensors}

    def _event(self, version: str, kind: str) -> bytes:
        return orjson.dumps({"name": self.name, "version": version, "event": kind, "replica": self.replica_id})

    async def seed(self, version: str, files: dict[str, bytes]) -> bool:
        """Publish a local version Redis lacks (first start, or Redis lost its data); True if written."""
        keys = [self._file_key(version, MANIFEST), self._file_key(version, TENSORS), self._keys["versions"]]
        try:
            return bool(await self._call("seed", lambda: self._seed(keys=keys, args=[files[MANIFEST], files[TENSORS],
                                                                                       _number(version), version])))
        except ResponseError as err:
            raise VersionConflict(f"{self.name}/{version} is published with other content: {err}") from None

    async def seed_active(self, version: str) -> bool:
        """Point the fleet at ``version`` only where no replica has set a pointer yet."""
        return bool(await self._call("seed active", lambda: self.redis.set(self._keys["active"], version, nx=True)))

    async def set_active(self, version: str) -> None:
        """Roll back or forward: the pointer moves and every replica is told at once."""
        if version not in await self.versions():
            raise KeyError(f"subspace {self.name!r} has no published version {version!r}")

        async def move() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self._keys["active"], version)
                pipe.publish(self.channel, self._event(version, "activate"))
                await pipe.execute()

        await self._call("activate", move)

    async def next_version(self, local_versions: list[str]) -> str:
        """The next version number, above everything published anywhere (call while holding the lock)."""
        published = await self.versions()
        numbers = [_number(v) for v in published + local_versions]
        return f"v{max(numbers, default=0) + 1}"

    async def publish(self, lease: RefitLease, version: str, files: dict[str, bytes], *, activate: bool) -> None:
        """Publish a refit's version atomically, fenced by the lease."""
        keys = [self._keys["lock"], self._keys["fence"], self._file_key(version, MANIFEST), self._file_key(version, TENSORS),
                self._keys["versions"], self._keys["active"]]
        args: list[EncodableT] = [lease.value, lease.token, files[MANIFEST], files[TENSORS], _number(version), version, int(activate),
                self.channel, self._event(version, "publish")]
        try:
            await self._call("publish", lambda: self._publish(keys=keys, args=args))
        except ResponseError as err:
            if "LOCKLOST" in str(err):
                raise LockLost(f"the refit lock of {self.name!r} passed to another replica; {version} was not published") from None
            raise VersionConflict(f"{self.name}/{version} is already published with other content") from None

    # ----------------------------------------------------------------------------- refit lock
    async def acquire(self, job_id: str) -> RefitLease:
        suffix = f"{job_id}:{self.replica_id}:{uuid.uuid4().hex[:8]}"
        token, value = await self._call(
            "lock", lambda: self._acquire(keys=[self._keys["lock"], self._keys["fence"]], args=[suffix, self.lock_ttl_ms])
        )
        if not token:
            raise RefitLocked(f"a refit of subspace {self.name!r} is already running in the fleet (job {value.decode().split(':')[1]})")
        return RefitLease(self.name, job_id, int(token), value.decode())

    async def renew(self, lease: RefitLease) -> bool:
        return bool(await self._call("renew", lambda: self._renew(keys=[self._keys["lock"]], args=[lease.value, self.lock_ttl_ms])))

    async def release(self, lease: RefitLease) -> None:
        await self._call("release", lambda: self._release(keys=[self._keys["lock"]], args=[lease.value]))

    async def holds(self, lease_value: str) -> bool:
        holder = await self._call("lock", lambda: self.redis.get(self._keys["lock"]))
        return holder is not None and holder.decode() == lease_value

    # ----------------------------------------------------------------------------- jobs
    async def put_job(self, job: dict[str, Any]) -> None:
        key = self._job_prefix + job["job_id"]
        await self._call("job", lambda: self.redis.set(key, orjson.dumps(job), ex=self.job_ttl_s))

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        """A job as any replica sees it; an unfinished job whose lock has lapsed reads as failed."""
        raw = await self._call("job", lambda: self.redis.get(self._job_prefix + job_id))
        if raw is None:
            return None
        job: dict[str, Any] = orjson.loads(raw)
        if job["status"] in ("queued", "running") and job.get("lease") and not await self.holds(job["lease"]):
            job.update(status="failed", finished_at=job.get("finished_at") or time.time(),
                       error=f"replica {job.get('replica')!r} stopped before the job finished (its refit lock expired)")
        return job

    # ----------------------------------------------------------------------------- events
    async def listen(self, on_event: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Deliver version events until cancelled or the connection fails (then ``FleetUnavailable``)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call("subscribe", lambda: pubsub.subscribe(self.channel))
            while True:
                message = await self._call("listen", lambda: pubsub.get_message(timeout=1.0))
                if message is not None and message.get("type") == "message":
                    await on_event(orjson.loads(message["data"]))
        finally:
            try:
                await pubsub.aclose()
            except (RedisError, OSError):
                pass
