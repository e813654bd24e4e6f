"""What every benchmark shares: realistic texts, the machine's description, the results file, a
matmul ceiling, and the HTTP load driver (closed loop: ``concurrency`` clients, one item per request).

Benchmarks are not tests: they measure, and every figure they save is a ratio of two things measured
in the same run, because this machine is shared and its absolute speed drifts from minute to minute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
import typer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
CLIENT_NICE = 19  # the load generator's priority (see drive)
RESULTS = Path(__file__).resolve().parent / "results.json"

#: Service settings every HTTP benchmark starts from: the cache off (repeated items would be served
#: from it, and only the cache benchmark measures that), logs quiet (a log line per request is work).
SERVICE_ENV = {"SAFT_CACHE_MAX_BYTES": "0", "SAFT_LOG_LEVEL": "WARNING"}


def rows(n: int, seed: int = 0, source: str = "dev_eval") -> list[dict[str, Any]]:
    """``n`` lines of the shared data (shuffled, deterministic), repeated when ``n`` exceeds the file."""
    lines = [json.loads(line) for line in (DATA / f"{source}.jsonl").open()]
    random.Random(seed).shuffle(lines)
    return [lines[i % len(lines)] for i in range(n)]


def texts(n: int, seed: int = 0, source: str = "dev_eval") -> list[dict[str, Any]]:
    """Realistic items (pairs and prompts) from the shared data, as users would send them."""
    return [{"prompt": r["prompt"], "response": r["response"]} if r["kind"] == "pair" else {"text": r["text"]}
            for r in rows(n, seed, source)]


def plain_texts(n: int, seed: int = 0, source: str = "dev_eval") -> list[str]:
    """The same data as single strings (a pair as prompt, blank line, response): what any embedding API takes."""
    return [f"{r['prompt']}\n\n{r['response']}" if r["kind"] == "pair" else r["text"] for r in rows(n, seed, source)]


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Hypervisor vendor")
    return {k: fields[k].strip() for k in keep if k in fields}


def machine() -> dict[str, Any]:
    load1, load5, _ = os.getloadavg()
    return {"cpu": _lscpu().get("Model name") or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_1m_5m": [round(load1, 2), round(load5, 2)]}


def save(name: str, result: dict[str, Any], results: Path = RESULTS) -> dict[str, Any]:
    """Merge one benchmark's result into the results file (atomically) and print it."""
    data = json.loads(results.read_text()) if results.exists() else {}
    data[name] = {**result, "machine": machine(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fd, tmp = tempfile.mkstemp(dir=results.parent, prefix=".results.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, results)
    typer.echo(json.dumps(data[name], indent=2))
    return data[name]


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """The chip's dense matmul rate in this dtype: the ceiling an embedding pass can approach."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def in_worker_thread(fn: Callable[[], Any], nice: int = 0) -> Any:
    """Run ``fn`` in a fresh thread, as the service runs every forward pass (its batcher's worker).

    Measured on this shared machine under load: the same passes ran 2-4x slower from the main
    thread than from a fresh one (0.13-0.49 vs 0.94-1.19 texts/s, alternating), so the core is
    timed the way the service runs it. ``nice`` lowers that thread's priority alone (Linux).
    """
    out: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            if nice:
                os.setpriority(os.PRIO_PROCESS, 0, nice)  # who=0: this thread only, on Linux
            out.append(fn())
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
            errors.append(err)

    thread = threading.Thread(target=target, name="bench-core")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def drive(base: str, payloads: list[Any], concurrency: int, path: str = "/score",
          body: Callable[[Any], Any] = lambda item: {"items": [item]}, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Send every payload once, one per request, from ``concurrency`` closed-loop clients.

    Returns texts/s over the whole run, the p50/p99 of per-request latency, and the client's own CPU
    seconds. The client shares this machine's two cores with the service — in production it runs
    elsewhere — so it runs at the lowest priority (nice 19): it takes CPU the service leaves idle
    instead of preempting a forward pass, whose threads all wait for the slowest one at every op.
    """

    async def run() -> dict[str, Any]:
        latencies: list[float] = []
        queue = list(range(len(payloads)))[::-1]
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits, headers=headers) as client:

            async def worker() -> None:
                while queue:
                    i = queue.pop()
                    t0 = time.perf_counter()
                    r = await client.post(path, json=body(payloads[i]))
                    r.raise_for_status()
                    latencies.append(time.perf_counter() - t0)

            start, cpu = time.perf_counter(), time.thread_time()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
        return {**summarize(concurrency, elapsed, latencies), "client_cpu_s": round(cpu, 2)}

    return in_worker_thread(lambda: asyncio.run(run()), nice=CLIENT_NICE)


def summarize(concurrency: int, seconds: float, latencies: list[float]) -> dict[str, Any]:
    lat = sorted(latencies)
    return {"concurrency": concurrency, "requests": len(lat), "seconds": round(seconds, 3), "texts_per_s": round(len(lat) / seconds, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * percentile(lat, 0.99), 1),
            "_latencies": latencies}


def alternate(targets: dict[str, Callable[[int], dict[str, Any]]], concurrency: int, rounds: int = 2) -> dict[str, dict[str, Any]]:
    """Run each target ``rounds`` times at ``concurrency`` in ABBA order and pool the runs per target.

    Two services compared on a shared machine see the same load only if their runs interleave.
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    names = list(targets)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(targets[name](concurrency))
    return {name: {**summarize(concurrency, sum(x["seconds"] for x in rs), [t for x in rs for t in x["_latencies"]]),
                   "client_cpu_s": round(sum(x["client_cpu_s"] for x in rs), 2)}
            for name, rs in runs.items()}


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A driver result without its raw latencies (what goes into results.json)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


@contextmanager
def saft_server(env: dict[str, str], log_dir: Path | None = None) -> Iterator[str]:
    """A real ``saft serve`` on loopback (the tests' launcher) with ``SERVICE_ENV`` plus ``env``."""
    from app.launcher import running_server

    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="saft-bench-"))
    with running_server({**SERVICE_ENV, **env}, log_dir / "server.log", timeout_s=600) as base:
        yield base


def parse_env(pairs: list[str] | None, prefixes: tuple[str, ...] = ("SAFT_",)) -> dict[str, str]:
    """``KEY=VALUE`` options into a dict (the service's settings for a benchmark run; ``prefixes``: the names allowed)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith(prefixes):
            raise typer.BadParameter(f"--env: expected {'|'.join(prefixes)}NAME=value, got {pair!r}")
        out[key] = value
    return out


def batch_limits(settings: Any) -> dict[str, int]:
    """The batch limits a service with these settings uses (``BatchLimits``), as a record for the results."""
    from app.core.embedding import BatchLimits

    return dataclasses.asdict(BatchLimits(settings.max_batch_tokens, settings.max_batch_size))


def settings_for(env: dict[str, str]) -> Any:
    """The Settings the service will see under ``env`` (same names, same validation)."""
    from app.config import Settings

    fields = {key[len("SAFT_"):].lower(): value for key, value in env.items()}
    return Settings(**fields)
