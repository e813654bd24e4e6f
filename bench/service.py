"""Benchmarks through HTTP: the service vs the core, batching on vs off, the embedding cache on vs off.

Each starts real ``saft serve`` processes on loopback (the same launcher as the end-to-end tests) and
drives them with closed-loop clients, one item per request.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from app.config import Settings
from bench.common import (
    RESULTS,
    alternate,
    batch_limits,
    drive,
    in_worker_thread,
    parse_env,
    public,
    saft_server,
    save,
    settings_for,
    texts,
)

ResultsOpt = Annotated[Path, typer.Option(help="Results file to merge into.")]
EnvOpt = Annotated[list[str] | None, typer.Option("--env", help="SAFT_NAME=value for the service (and the core).")]


class Core:
    """The core in-process with the service's own model, subspace config and batch limits."""

    def __init__(self, env: dict[str, str]) -> None:
        from app.core.embedding import Embedder
        from app.store.artifacts import load_version

        settings = settings_for(env)
        _, manifest = load_version(settings.models_dir, settings.subspace_name)
        self.embedder = Embedder.from_settings(settings, manifest.model_id)
        self.config = manifest.embedding
        self.limits = dataclasses.asdict(self.embedder.batch_limits)  # from the settings (Embedder.from_settings)
        self.info = {"subspace": f"{manifest.name}/{manifest.version}", "model": manifest.model_id, **self.limits}

    def rate(self, items: list[dict[str, Any]]) -> float:
        """Texts/s on ``items``: tokenize, then length-sorted batches within the service's limits."""
        from app.core.items import parse_item

        parsed = [parse_item(t) for t in items]

        def run() -> float:
            start = time.perf_counter()
            encoded = self.embedder.encode_items(parsed, self.config)
            self.embedder.embed(encoded, self.config)  # from_settings: the service's batch limits
            return len(items) / (time.perf_counter() - start)

        return in_worker_thread(run)


def service(
    n: Annotated[int, typer.Option(help="Requests per concurrency level (one item each).")] = 256,
    concurrency: Annotated[str, typer.Option(help="Client concurrency levels.")] = "1,8,32,128",
    env: EnvOpt = None,
    results: ResultsOpt = RESULTS,
) -> None:
    """Texts/s and p50/p99 through HTTP per concurrency vs the core in-process on the same texts.

    The core runs on the same texts before the first level and after each one; each level is
    compared with the mean of the two core runs around it, so the machine's drifting load (it is
    shared) shows up in ``core_runs_texts_per_s`` rather than as a wrong ratio.
    """
    env_d = parse_env(env)
    items = texts(n, seed=1)
    core = Core(env_d)
    core.rate(items[:8])  # warm-up
    cores = [core.rate(items)]
    typer.echo(f"core: {cores[-1]:.2f} texts/s")
    levels = []
    with saft_server(env_d) as base:
        drive(base, items[:16], 4)  # warm-up
        for level in (int(x) for x in concurrency.split(",")):
            row = public(drive(base, items, level))
            cores.append(core.rate(items))  # the server idles meanwhile
            # Bracketed by the core runs just before and after it: the load they saw is the load it saw.
            row["core_texts_per_s"] = round((cores[-2] + cores[-1]) / 2, 2)
            row["ratio_to_core"] = round(row["texts_per_s"] / row["core_texts_per_s"], 3)
            levels.append(row)
            typer.echo(json.dumps(row))
    save("service-vs-core", {"command": "python -m bench.run service", "items": n, **core.info, "env": env_d,
                             "core_runs_texts_per_s": [round(c, 2) for c in cores], "by_concurrency": levels}, results)


def batching(
    n: Annotated[int, typer.Option(help="Requests per run (one item each).")] = 160,
    concurrency: Annotated[str, typer.Option(help="Client concurrency levels.")] = "8,32",
    env: EnvOpt = None,
    results: ResultsOpt = RESULTS,
) -> None:
    """The service with its batcher (defaults) vs the same service with batching off (max_batch_size 1)."""
    env_d = parse_env(env)
    items = texts(n, seed=2)
    variants = {"on": env_d, "off": {**env_d, "SAFT_MAX_BATCH_SIZE": "1"}}
    limits = {label: batch_limits(settings_for(variant)) for label, variant in variants.items()}
    by_level = []
    with saft_server(variants["on"]) as on_url, saft_server(variants["off"]) as off_url:
        for url in (on_url, off_url):
            drive(url, items[:16], 4)  # warm-up
        for c in (int(x) for x in concurrency.split(",")):
            # Both servers are up; their runs interleave (ABBA) so that both see the same load.
            pooled = alternate({"on": lambda c, u=on_url: drive(u, items, c), "off": lambda c, u=off_url: drive(u, items, c)}, c)
            on, off = pooled["on"], pooled["off"]
            by_level.append({"concurrency": c, "on_texts_per_s": on["texts_per_s"], "off_texts_per_s": off["texts_per_s"],
                             "speedup": round(on["texts_per_s"] / off["texts_per_s"], 3),
                             "on_p50_ms": on["p50_ms"], "off_p50_ms": off["p50_ms"], "on_p99_ms": on["p99_ms"], "off_p99_ms": off["p99_ms"]})
            typer.echo(json.dumps(by_level[-1]))
    save("batching", {"command": "python -m bench.run batching", "items": n, "rounds": 2, "env": env_d, "limits": limits,
                      "by_concurrency": by_level}, results)


def duplicated(n: int, share: float, seed: int = 3) -> tuple[list[dict[str, Any]], int]:
    """``n`` items of which ``share`` repeat an earlier-drawn one, shuffled: (items, distinct count)."""
    distinct = max(1, round(n * (1 - share)))
    base = texts(distinct, seed=seed)
    rng = random.Random(seed)
    items = base + [rng.choice(base) for _ in range(n - distinct)]
    rng.shuffle(items)
    return items, distinct


def cache(
    n: Annotated[int, typer.Option(help="Requests per run (one item each).")] = 200,
    duplicates: Annotated[float, typer.Option(help="Share of requests that repeat another one.")] = 0.3,
    concurrency: int = 32,
    env: EnvOpt = None,
    results: ResultsOpt = RESULTS,
) -> None:
    """A dataset with repeated items through the service, the embedding cache on vs off."""
    env_d = parse_env(env)
    items, distinct = duplicated(n, duplicates)
    warm = texts(16, seed=99)  # not in the dataset, so the warm-up fills no useful cache entry
    with saft_server({**env_d, "SAFT_CACHE_MAX_BYTES": "0"}) as off_url, \
            saft_server({**env_d, "SAFT_CACHE_MAX_BYTES": str(Settings.model_fields["cache_max_bytes"].default)}) as on_url:
        for url in (off_url, on_url):
            drive(url, warm, 4)
        # One pass each: a second pass on the cached server would find every item cached.
        runs = alternate({"off": lambda c: drive(off_url, items, c), "on": lambda c: drive(on_url, items, c)}, concurrency, rounds=1)
    for label, run in runs.items():
        typer.echo(f"cache {label}: {json.dumps(public(run))}")
    save("cache", {"command": "python -m bench.run cache", "items": n, "distinct": distinct, "duplicate_share": duplicates,
                   "concurrency": concurrency, "env": env_d, "off": public(runs["off"]), "on": public(runs["on"]),
                   "speedup": round(runs["on"]["texts_per_s"] / runs["off"]["texts_per_s"], 3),
                   "ideal_speedup": round(n / distinct, 3)}, results)


#: Environment a ``threads`` variant may set: the service's settings and the thread runtimes' own variables.
_THREAD_ENV_PREFIXES = ("SAFT_", "OMP_", "GOMP_", "MKL_", "KMP_")


def _variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, pairs = spec.partition(":")
    env = parse_env(list(filter(None, pairs.split(","))), _THREAD_ENV_PREFIXES)
    if not name:
        raise typer.BadParameter(f"--variant {spec!r} has no name")
    return name, env


def threads(
    variant: Annotated[list[str], typer.Option(help="NAME:KEY=VALUE,... (empty after the colon: the defaults); two or more.")],
    n: Annotated[int, typer.Option(help="Requests per run (one item each).")] = 96,
    concurrency: int = 32,
    rounds: Annotated[int, typer.Option(help="Runs per variant, in alternating order.")] = 2,
    results: ResultsOpt = RESULTS,
) -> None:
    """Thread settings of the service compared through HTTP: every variant's server up at once, runs alternating.

    E.g. ``--variant default: --variant passive:OMP_WAIT_POLICY=PASSIVE --variant one-thread:SAFT_NUM_THREADS=1``.
    """
    variants = dict(_variant(v) for v in variant)
    if len(variants) < 2:
        raise typer.BadParameter("give at least two --variant")
    items = texts(n, seed=5)
    from contextlib import ExitStack

    with ExitStack() as stack:
        urls = {name: stack.enter_context(saft_server(env)) for name, env in variants.items()}
        for url in urls.values():
            drive(url, items[:16], 4)  # warm-up
        pooled = alternate({name: (lambda c, u=url: drive(u, items, c)) for name, url in urls.items()}, concurrency, rounds)
    first = next(iter(variants))
    rows = {name: {**public(run), "env": variants[name],
                   "ratio_to_" + first: round(run["texts_per_s"] / pooled[first]["texts_per_s"], 3)} for name, run in pooled.items()}
    for name, row in rows.items():
        typer.echo(f"{name}: {json.dumps(row)}")
    save("threads", {"command": "python -m bench.run threads " + " ".join(f"--variant {v}" for v in variant),
                     "items": n, "concurrency": concurrency, "rounds": rounds, "variants": rows}, results)
