"""Where the heap in use grows when every request runs the model (issue 18 part 1; a one-off command, not in CI).

    python scripts/heap_growth.py --warm 300 --requests 1200 --out docs/reports/memory-r1/tracemalloc.json

The real app (``create_app``: routes, middleware, the service, the model) in this process, its lifespan run, driven
through httpx's ASGI transport (no sockets: uvicorn is not in the picture) with the embedding cache off, so every
request runs a forward pass. After ``--warm`` requests, tracemalloc starts and takes a snapshot; after ``--requests``
more (each a distinct text, ``--concurrency`` at a time) a second one: the allocations that grew between them, grouped
by where they were made (Python and numpy allocations; torch's own CPU allocator is not traced), beside this process's
RSS and glibc's heap in use / free at both points.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.serving.memory import heap_stats, resident_bytes, trim  # this checkout


def texts(n: int) -> list[str]:
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev_eval.jsonl"
    pool = [json.loads(line).get("text") or json.loads(line).get("prompt") for line in data.open()]
    return [f"{pool[i % len(pool)]} (#{i})" for i in range(n)]


def state() -> dict[str, float]:
    gc.collect()
    trim()
    heap = heap_stats()
    rss = resident_bytes()
    return {"rss_mb": round((rss or 0) / 2**20, 1),
            "heap_in_use_mb": round(heap.in_use / 2**20, 1) if heap else float("nan"),
            "heap_free_mb": round(heap.free / 2**20, 1) if heap else float("nan")}


async def drive(client: httpx.AsyncClient, batch: list[str], concurrency: int) -> None:
    queue = list(batch)

    async def worker() -> None:
        while queue:
            text = queue.pop()
            r = await client.post("/score", json={"items": [{"text": text}]})
            r.raise_for_status()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("SAFT_CACHE_MAX_BYTES", "0")
    from app.api.app import create_app
    from app.config import Settings

    app = create_app(Settings())
    pool = texts(args.warm + args.requests)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://saft", timeout=600) as client:
            await drive(client, pool[: args.warm], args.concurrency)
            tracemalloc.start(args.frames)
            before, first = state(), tracemalloc.take_snapshot()
            await drive(client, pool[args.warm :], args.concurrency)
            after, second = state(), tracemalloc.take_snapshot()
    keep = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    stats = second.filter_traces(keep).compare_to(first.filter_traces(keep), "traceback")
    grown = [s for s in stats if s.size_diff > 0][: args.top]
    return {
        "command": "python scripts/heap_growth.py " + " ".join(sys.argv[1:]),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("SAFT_", "MKL_", "OMP_", "ONEDNN_", "MALLOC_"))},
        "warm_requests": args.warm, "requests": args.requests,
        "before": before, "after": after,
        "traced_growth_mb": round(sum(s.size_diff for s in stats) / 2**20, 2),
        "top": [{"kb": round(s.size_diff / 1024, 1), "count": s.count_diff,
                 "where": [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in s.traceback][-6:]} for s in grown],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", type=int, default=300)
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args()
    report = asyncio.run(main(arguments))
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.out:
        arguments.out.write_text(text + "\n")
