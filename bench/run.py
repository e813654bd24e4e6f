"""Benchmark harness: ``python -m bench.run core|service [...]``; results merge into bench/results.json.

Each benchmark measures its ratios within one run (this machine is noisy): the core against a plain
matmul, the service against the core on the same texts.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from app.embedding import Embedder, EmbeddingConfig
from app.items import parse_item

app = typer.Typer(add_completion=False)
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results.json"


def texts(n: int, seed: int = 0, source: str = "dev_eval") -> list[dict[str, Any]]:
    """Realistic items (pairs and prompts) from the shared data, as users would send them."""
    rows = [json.loads(line) for line in (DATA / f"{source}.jsonl").open()]
    random.Random(seed).shuffle(rows)
    return [{"prompt": r["prompt"], "response": r["response"]} if r["kind"] == "pair" else {"text": r["text"]} for r in rows[:n]]


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


ResultsOpt = Annotated[Path, typer.Option(help="Results file to merge into.")]


def save(name: str, result: dict[str, Any], results: Path = RESULTS) -> None:
    data = json.loads(results.read_text()) if results.exists() else {}
    data[name] = {**result, "machine": machine(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fd, tmp = tempfile.mkstemp(dir=results.parent, prefix=".results.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, results)
    typer.echo(json.dumps(data[name], indent=2))


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """The chip's dense matmul rate in this dtype: the ceiling an embedding pass can approach."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def block_params(embedder: Embedder, n_blocks: int) -> int:
    return sum(p.numel() for block in list(embedder._blocks)[:n_blocks] for p in block.parameters())


@app.command()
def core(
    n: Annotated[int, typer.Option(help="Items.")] = 256,
    layers: Annotated[str, typer.Option(help="Layer(s) embedded.")] = "20",
    max_length: int = 256,
    batch_sizes: Annotated[str, typer.Option(help="Max batch sizes to try.")] = "1,4,8,16,32",
    model: str = "smollm2-135m-instruct",
    device: str = "auto",
    results: ResultsOpt = RESULTS,
) -> None:
    """Embedding throughput of the core by batch size, vs a large matmul's GFLOP/s in the same run."""
    embedder = Embedder.load(model, device=device)
    config = EmbeddingConfig(layers=tuple(int(x) for x in layers.split(",")), pooling="mean", max_length=max_length)
    encoded = embedder.encode_items([parse_item(t) for t in texts(n)], config)
    tokens = sum(len(e.input_ids) for e in encoded)
    deepest = max(embedder.normalize_layers(config.layers))
    flops_per_token = 2 * block_params(embedder, deepest)
    embedder.embed(encoded[:8], config)  # warm-up
    peak = matmul_gflops(embedder.device, embedder.dtype)
    rows = []
    for bs in (int(x) for x in batch_sizes.split(",")):
        start = time.perf_counter()
        embedder.embed(encoded, config, max_batch_tokens=1 << 30, max_batch_size=bs)
        elapsed = time.perf_counter() - start
        gflops = flops_per_token * tokens / elapsed / 1e9
        rows.append({"batch_size": bs, "seconds": round(elapsed, 3), "texts_per_s": round(n / elapsed, 2),
                     "tokens_per_s": round(tokens / elapsed, 1), "gflops": round(gflops, 1),
                     "fraction_of_matmul": round(gflops / peak, 3)})
        typer.echo(json.dumps(rows[-1]))
    best = max(rows, key=lambda r: r["tokens_per_s"])
    save(f"core-{embedder.device.type}", {"items": n, "tokens": tokens, "layers": list(config.layers), "blocks_run": deepest,
                                          "max_length": max_length, "matmul_gflops": round(peak, 1), "by_batch_size": rows, "best": best},
         results)


@app.command()
def service(
    n: Annotated[int, typer.Option(help="Items (each request carries one).")] = 192,
    concurrency: Annotated[str, typer.Option(help="Client concurrency levels.")] = "1,8,32",
    url: Annotated[str | None, typer.Option(help="A running service; default: start one on loopback.")] = None,
    results: ResultsOpt = RESULTS,
) -> None:
    """Texts/s and latency through HTTP at several concurrencies vs the core in-process at its best batch size."""
    import httpx

    from app.artifacts import load_version
    from app.config import get_settings
    from tests.server import running_server

    settings = get_settings()
    _, manifest = load_version(settings.models_dir, settings.subspace_name)
    items = texts(n, seed=1)
    embedder = Embedder.load(manifest.model_id)
    encoded = embedder.encode_items([parse_item(t) for t in items], manifest.embedding)
    embedder.embed(encoded[:8], manifest.embedding)
    start = time.perf_counter()
    embedder.embed(encoded, manifest.embedding, max_batch_tokens=settings.max_batch_tokens, max_batch_size=settings.max_batch_size)
    core_rate = n / (time.perf_counter() - start)
    del embedder

    async def drive(base: str, level: int) -> dict[str, Any]:
        latencies: list[float] = []
        queue = list(range(n))
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            async def worker() -> None:
                while queue:
                    i = queue.pop()
                    t0 = time.perf_counter()
                    r = await client.post("/score", json={"items": [items[i]]})
                    r.raise_for_status()
                    latencies.append(time.perf_counter() - t0)
            t = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(level)))
            elapsed = time.perf_counter() - t
        lat = sorted(latencies)
        return {"concurrency": level, "texts_per_s": round(n / elapsed, 2), "ratio_to_core": round(n / elapsed / core_rate, 3),
                "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1)}

    def run(base: str) -> list[dict[str, Any]]:
        asyncio.run(drive(base, 4))  # warm-up
        out = []
        for level in (int(x) for x in concurrency.split(",")):
            out.append(asyncio.run(drive(base, level)))
            typer.echo(json.dumps(out[-1]))
        return out

    if url:
        rows = run(url)
    else:
        with running_server({}, Path(tempfile.mkdtemp()) / "server.log") as base:
            rows = run(base)
    save("service-vs-core", {"items": n, "subspace": f"{manifest.name}/{manifest.version}", "core_texts_per_s": round(core_rate, 2),
                             "core_batch": {"max_batch_tokens": settings.max_batch_tokens, "max_batch_size": settings.max_batch_size},
                             "by_concurrency": rows}, results)


if __name__ == "__main__":
    app()
