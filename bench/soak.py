"""Soak / load test of the real service: loopback only, fixed duration, phases at and beyond capacity.

    python -m bench.soak --minutes 8            # starts its own server (models/default), writes bench/soak.json
    python -m bench.soak --url http://127.0.0.1:8000 --pid 1234 --minutes 8

Phases: warm-up (8 clients, then a short burst at the peak's 48), at capacity (4), beyond capacity (48 clients
against a small queue, so the service must shed load with 429 + Retry-After), recovery (2). The warm-up visits every
load level once, so that what a first peak allocates for good (threads, the allocator's per-thread caches and arenas,
buffers sized by the queue) counts as warm-up, and growth after it is creep: the last sample minus the warm-up's
last, and a least-squares trend over everything after the warm-up (MB per 10 minutes). Per phase: requests, status codes,
429s without Retry-After, transport errors, latency percentiles of the 200s, and the server's
resident memory (VmRSS) with the server's own heap and cache gauges (``saft_heap_bytes``, ``saft_cache_bytes``)
sampled every ``--sample-s`` seconds: the curve says where memory goes (the cache filling to its bound, heap in use,
free heap that malloc holds). tests/test_reliability_load.py runs a short version.

    python -m bench.soak --minutes 30 --env SAFT_MALLOC_TRIM_INTERVAL_S=0 --out /tmp/soak-untrimmed.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from app.serving.memory import resident_bytes

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev_eval.jsonl"
SERVER_ENV = {"SAFT_MAX_QUEUE": "64", "SAFT_MAX_ITEMS_PER_REQUEST": "16", "SAFT_FILTER_CHUNK_LINES": "16"}


@dataclass
class Phase:
    name: str
    seconds: float
    clients: int


@dataclass
class PhaseResult:
    name: str
    clients: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    missing_retry_after: int = 0
    transport_errors: Counter[str] = field(default_factory=Counter)  # by endpoint (a client timeout is one)
    wrong_results: int = 0
    latencies_ok: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)  # t (s since the soak began), rss, heap, cache in MB

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ok) * 1000 if self.latencies_ok else np.zeros(1)
        return {
            "phase": self.name, "clients": self.clients, "seconds": self.seconds,
            "requests": sum(self.statuses.values()), "statuses": dict(sorted(self.statuses.items())),
            "ok_per_s": round(self.statuses.get(200, 0) / self.seconds, 2),
            "missing_retry_after": self.missing_retry_after, "transport_errors": dict(self.transport_errors),
            "wrong_results": self.wrong_results,
            "latency_ms_ok": {"p50": round(float(np.percentile(lat, 50)), 1), "p95": round(float(np.percentile(lat, 95)), 1),
                              "p99": round(float(np.percentile(lat, 99)), 1)},
            "rss_mb": {"start": self.rss_mb[0], "end": self.rss_mb[-1], "max": max(self.rss_mb)} if self.rss_mb else None,
            "end_sample": self.samples[-1] if self.samples else None,
        }


def texts(limit: int = 400) -> list[str]:
    rows = [json.loads(line) for line in DATA.open()]
    return [(r.get("text") or r.get("prompt") or "")[:limit] for r in rows if r.get("text") or r.get("prompt")]


def thread_count(pid: int | None) -> int | None:
    """The server's thread count (``Threads:`` in /proc/PID/status), None without its pid or /proc."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb(pid: int | None) -> float | None:
    """The server's VmRSS in MB (``app.serving.memory.resident_bytes``), None without its pid."""
    value = resident_bytes(pid) if pid is not None else None
    return None if value is None else round(value / 2**20, 1)


async def _client(client: httpx.AsyncClient, pool: list[str], deadline: float, result: PhaseResult, rng: random.Random,
                  filter_share: float) -> None:
    while time.monotonic() < deadline:
        n = rng.randint(1, 8)
        sample = rng.sample(pool, n)
        start = time.perf_counter()
        endpoint = "/filter" if rng.random() < filter_share else "/score"  # a small /filter stream now and then
        try:
            if endpoint == "/filter":
                body = "\n".join(json.dumps({"text": t}) for t in sample).encode() + b"\n"
                r = await client.post("/filter", content=body, headers={"content-type": "application/x-ndjson"})
                ok = r.status_code != 200 or json.loads(r.text.splitlines()[-1]).get("total") == n
            else:
                r = await client.post("/score", json={"items": [{"text": t} for t in sample]})
                ok = r.status_code != 200 or len(r.json()["results"]) == n
        except httpx.TransportError:
            result.transport_errors[endpoint] += 1
            await asyncio.sleep(0.1)
            continue
        elapsed = time.perf_counter() - start
        result.statuses[r.status_code] += 1
        result.wrong_results += not ok
        if r.status_code == 200:
            result.latencies_ok.append(elapsed)
        elif r.status_code == 429:
            if not r.headers.get("retry-after", "").isdigit() or int(r.headers["retry-after"]) < 1:
                result.missing_retry_after += 1
            await asyncio.sleep(min(1.0, int(r.headers.get("retry-after", "1")) / 4))  # impatient: a quarter of Retry-After, at most 1 s


async def server_memory(client: httpx.AsyncClient) -> dict[str, float]:
    """The server's heap (in use, free, mmapped) and cache gauges from /metrics, in MB."""
    r = await client.get("/metrics")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.value != sample.value:  # NaN: no glibc heap to report (jemalloc preloaded)
                continue
            if sample.name == "saft_heap_bytes":
                out[f"heap_{sample.labels['state']}_mb"] = round(sample.value / 2**20, 1)
            elif sample.name == "saft_cache_bytes":
                out["cache_mb"] = round(sample.value / 2**20, 1)
    return out


async def run_phases(url: str, phases: list[Phase], pid: int | None = None, seed: int = 0,
                     headers: dict[str, str] | None = None, filter_share: float = 0.1, sample_s: float = 1.0) -> list[PhaseResult]:
    pool = texts()
    results: list[PhaseResult] = []
    limits = httpx.Limits(max_connections=max(p.clients for p in phases) + 4)
    began = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client, \
            httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as probe:
        for phase in phases:
            result = PhaseResult(phase.name, phase.clients, phase.seconds)
            deadline = time.monotonic() + phase.seconds

            async def sample_rss(result: PhaseResult = result, deadline: float = deadline) -> None:
                while time.monotonic() < deadline:
                    value = rss_mb(pid)
                    if value is not None:
                        result.rss_mb.append(value)
                        try:
                            gauges = await server_memory(probe)
                        except httpx.HTTPError:
                            gauges = {}
                        threads = thread_count(pid)
                        result.samples.append({"t": round(time.monotonic() - began, 1), "rss_mb": value, **gauges,
                                               **({"threads": threads} if threads is not None else {})})
                    await asyncio.sleep(sample_s)

            rng = random.Random(seed + len(results))
            await asyncio.gather(sample_rss(), *(_client(client, pool, deadline, result, random.Random(rng.random()), filter_share)
                                                 for _ in range(phase.clients)))
            results.append(result)
    return results


def default_phases(minutes: float) -> list[Phase]:
    total = minutes * 60
    return [Phase("warm-up", 0.07 * total, 8), Phase("warm-up, peak", 0.03 * total, 48), Phase("at capacity", 0.3 * total, 4),
            Phase("beyond capacity", 0.45 * total, 48), Phase("recovery", 0.15 * total, 2)]


def growth_after_warm_up(results: list[PhaseResult]) -> tuple[dict[str, float], float | None]:
    """Each sampled quantity's last value minus its value at the end of the warm-up phases (those named "warm-up..."),
    and the least-squares slope of RSS over the samples after the warm-up, in MB per 10 minutes."""
    warm = [s for r in results if r.name.startswith("warm-up") for s in r.samples]
    after = [s for r in results if not r.name.startswith("warm-up") for s in r.samples]
    if not warm or not after:
        return {}, None
    growth = {key: round(after[-1][key] - warm[-1][key], 1) for key in warm[-1] if key != "t" and key in after[-1]}
    trend = None
    if len(after) >= 3:
        t = np.array([s["t"] for s in after])
        rss = np.array([s["rss_mb"] for s in after])
        trend = round(float(np.polyfit(t, rss, 1)[0]) * 600, 1)
    return growth, trend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--url", help="an already running server (default: start one with models/default)")
    parser.add_argument("--pid", type=int, help="its pid, for resident memory")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("soak.json"))
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--env", action="append", default=[], help="extra server setting NAME=VALUE (own server only)")
    args = parser.parse_args()
    phases = default_phases(args.minutes)
    env = {**SERVER_ENV, **dict(e.split("=", 1) for e in args.env)}
    if args.url:
        results = asyncio.run(run_phases(args.url, phases, args.pid, sample_s=args.sample_s))
    else:
        import tempfile

        from app.launcher import start_server, stop_server

        log = Path(tempfile.mkdtemp(prefix="saft-soak-")) / "server.log"
        proc, url = start_server(env, log)
        try:
            results = asyncio.run(run_phases(url, phases, proc.pid, sample_s=args.sample_s))
        finally:
            stop_server(proc)
    summaries = [r.summary() for r in results]
    growth, trend = growth_after_warm_up(results)
    command = " ".join(["python -m bench.soak", f"--minutes {args.minutes:g}", *(f"--env {e}" for e in args.env)])
    report = {"command": command, "server_env": env, "phases": summaries,
              "rss_growth_after_warm_up_mb": growth.get("rss_mb"), "growth_after_warm_up_mb": growth,
              "rss_trend_after_warm_up_mb_per_10min": trend,
              "curve": [sample | {"phase": r.name} for r in results for sample in r.samples]}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
