"""Fairness between callers: one bulk /filter stream against one interactive caller's sequential one-item /score.

Two client tokens on one real ``saft serve``, run in up to three modes: fair queuing with overtaking (the default:
a one-item batch runs while the bulk batch pauses between transformer blocks), fair queuing without it
(``SAFT_OVERTAKE_TOKENS=0``: the interactive item waits for the bulk batch's whole pass), and neither
(``SAFT_FAIR_QUEUING=false``, first come first served across clients). Phase "idle": the interactive caller alone. Phase "contended": the
same requests while the bulk caller streams a /filter upload of pairs. Reported: the interactive caller's p50 /
p90 latency in each phase, their ratio, its 429s, and the bulk stream's lines/s — measured in one run. The
issue's figure before fair queuing: p90 24.7 s contended against 0.15 s idle (x160).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from bench.common import RESULTS, parse_env, percentile, rows, saft_server, save

BULK, INTERACTIVE = "bench-bulk-token", "bench-interactive-token"


async def _interactive(url: str, items: list[dict[str, Any]], stop: asyncio.Event | None) -> dict[str, Any]:
    latencies: list[float] = []
    refused = 0
    async with httpx.AsyncClient(base_url=url, timeout=600, headers={"Authorization": f"Bearer {INTERACTIVE}"}) as client:
        for item in items:
            if stop is not None and stop.is_set():
                break
            start = time.perf_counter()
            r = await client.post("/score", json={"items": [item]})
            if r.status_code == 429:
                refused += 1
                continue
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
    latencies.sort()
    return {"requests": len(latencies), "refused_429": refused, "p50_s": percentile(latencies, 0.5),
            "p90_s": percentile(latencies, 0.9)}


async def _bulk(url: str, body: bytes, started: asyncio.Event, done: asyncio.Event) -> dict[str, Any]:
    start = time.perf_counter()
    lines = 0
    async with (httpx.AsyncClient(base_url=url, timeout=3600, headers={"Authorization": f"Bearer {BULK}"}) as client,
                client.stream("POST", "/filter", content=body, headers={"content-type": "application/x-ndjson"}) as r):
        r.raise_for_status()
        async for raw in r.aiter_lines():
            if raw:
                lines += 1
                started.set()
    done.set()
    seconds = time.perf_counter() - start
    return {"records": lines, "seconds": seconds, "lines_per_s": (lines - 1) / seconds}


async def _run(url: str, n_bulk: int, n_interactive: int) -> dict[str, Any]:
    bulk_rows = [r for r in rows(4 * n_bulk, seed=3) if r["kind"] == "pair"][:n_bulk]
    body = "\n".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) for r in bulk_rows).encode() + b"\n"
    items = [{"text": r["text"]} for r in rows(4 * n_interactive, seed=4) if r["kind"] != "pair"][:n_interactive]
    await _interactive(url, items[:3], None)  # warm-up
    idle = await _interactive(url, items, None)
    started, done = asyncio.Event(), asyncio.Event()
    bulk_task = asyncio.create_task(_bulk(url, body, started, done))
    await started.wait()  # the stream is running at full speed
    contended = await _interactive(url, items, done)
    bulk = await bulk_task
    return {"idle": idle, "contended": contended, "bulk": bulk,
            "p90_ratio": contended["p90_s"] / idle["p90_s"], "p50_ratio": contended["p50_s"] / idle["p50_s"],
            "contended_finished_before_bulk": contended["requests"] + contended["refused_429"] == len(items)}


def fairness(
    n_bulk: Annotated[int, typer.Option(help="Pairs in the bulk /filter upload.")] = 400,
    n_interactive: Annotated[int, typer.Option(help="Sequential one-item /score requests per phase.")] = 40,
    env: Annotated[list[str] | None, typer.Option("--env", help="SAFT_NAME=value for the service.")] = None,
    fcfs: Annotated[bool, typer.Option(help="Also run with fair queuing off (first come, first served).")] = True,
    no_overtake: Annotated[bool, typer.Option(help="Also run fair queuing without overtaking (SAFT_OVERTAKE_TOKENS=0).")] = True,
    name: Annotated[str, typer.Option(help="Key in the results file.")] = "fairness",
    results: Annotated[Path, typer.Option(help="Results file to merge into.")] = RESULTS,
) -> None:
    """One bulk /filter stream vs one interactive caller: the interactive p90 contended / idle, and its 429s."""
    extra = parse_env(env)
    out: dict[str, Any] = {"env": extra}
    modes: list[tuple[str, dict[str, str]]] = [("fair", {"SAFT_FAIR_QUEUING": "true"})]
    if no_overtake:
        modes.append(("fair_no_overtaking", {"SAFT_FAIR_QUEUING": "true", "SAFT_OVERTAKE_TOKENS": "0"}))
    if fcfs:
        modes.append(("first_come_first_served", {"SAFT_FAIR_QUEUING": "false"}))
    for mode, mode_env in modes:  # the same run, one server per mode
        with saft_server({"SAFT_API_TOKENS": f"{BULK},{INTERACTIVE}", **extra, **mode_env}) as url:
            out[mode] = asyncio.run(_run(url, n_bulk, n_interactive))
    out["target"] = "fair: interactive p90 within 4x of idle, no 429 (issue 18)"
    save(name, out, results)
