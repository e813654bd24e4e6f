"""Bulk filtering at scale: ``saft filter`` (local engine, and the Ray engine with 1 and 2 actors) over 10k and 50k lines.

Issue 17 part 4. The MiniLM encoder (the shipped ``all-minilm-l6-v2``) keeps the run short: a subspace is fitted on it
first (``bench.peer.fit_encoder_subspace``: ``--fit-rows`` calibration rows, into a temporary models directory), then the input
files are made from the shared data's texts, each made distinct by a numbered suffix (so no line repeats another), and
every run is its own ``saft filter`` process. Reported per run: lines/s, the peak resident memory of the whole process
tree (sampled every 0.2 s with psutil; Ray's raylet and workers are in the tree; shared pages count once per process, so
for Ray it is an upper bound), and whether every line was accounted for. Beside them, the core: ``Embedder.embed`` in
this process on the same texts — bulk lines/s should stay within 10% of it, and memory flat from 10k to 50k.

    python -m bench.run bulk                      # 10k and 50k, local + ray with 1 and 2 actors
    python -m bench.run bulk --sizes 2000 --no-ray
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer

from bench.common import RESULTS, rows, save
from bench.peer import SUBSPACE, fit_encoder_subspace


def _texts(n: int) -> list[str]:
    pool = [r["text"] for r in rows(3462, seed=5) if r.get("kind") != "pair" and r.get("text")]
    return [f"{pool[i % len(pool)]} (#{i})" for i in range(n)]


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _run(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One command; its wall seconds and its process tree's peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        handle = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak = max(peak, _tree_rss(handle))
            except psutil.Error:
                return
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{err.decode()[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 2**20, 1), "stdout": out.decode()}


def _count(path: Path) -> int:
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    return sum(1 for f in files for line in f.open() if line.strip())


def bulk(
    sizes: Annotated[str, typer.Option(help="Comma-separated line counts.")] = "10000,50000",
    ray: Annotated[bool, typer.Option(help="Also the Ray engine with 1 and 2 actors.")] = True,
    ray_sizes: Annotated[str, typer.Option(help="Line counts for the Ray runs.")] = "10000",
    ray_actors: Annotated[str, typer.Option(help="Comma-separated actor counts for the Ray runs.")] = "1,2",
    fit_rows: Annotated[int, typer.Option(help="Calibration rows for the encoder's subspace.")] = 1000,
    name: Annotated[str, typer.Option(help="Key in the results file.")] = "bulk",
    results: Annotated[Path, typer.Option(help="Results file to merge into.")] = RESULTS,
) -> None:
    """saft filter over large files: lines/s and peak RSS per size and engine, beside the core's texts/s."""
    work = Path(tempfile.mkdtemp(prefix="saft-bulk-"))
    models = work / "models"
    models.mkdir()
    env = {**os.environ, "SAFT_MODELS_DIR": str(models), "SAFT_SUBSPACE_NAME": SUBSPACE, "SAFT_LOG_LEVEL": "WARNING"}
    saft = [sys.executable, "-m", "app.cli"]
    fit_start = time.perf_counter()
    fit_encoder_subspace(models, fit_rows)
    fit_seconds = time.perf_counter() - fit_start
    counts = sorted({int(n) for n in sizes.split(",")} | ({int(n) for n in ray_sizes.split(",")} if ray else set()))
    texts = _texts(max(counts))
    inputs = {}
    for n in counts:
        inputs[n] = work / f"input-{n}.jsonl"
        inputs[n].write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts[:n])))

    from app.core.embedding import Embedder
    from app.store.artifacts import load_version

    _, manifest = load_version(models, SUBSPACE)
    embedder = Embedder.load(manifest.model_id)
    sample = texts[:2000]
    encoded = embedder.encode(sample, manifest.embedding)
    start = time.perf_counter()
    embedder.embed(encoded, manifest.embedding)
    core = len(sample) / (time.perf_counter() - start)
    del embedder

    runs: list[dict[str, Any]] = []
    plan = [("local", None, n) for n in sorted(int(x) for x in sizes.split(","))]
    if ray:
        plan += [("ray", int(actors), int(n)) for n in ray_sizes.split(",") for actors in ray_actors.split(",")]
    for engine, actors, n in plan:
        out = work / f"out-{engine}-{actors}-{n}"
        out.mkdir()
        suffix = "" if engine == "ray" else ".jsonl"
        args = [*saft, "filter", str(inputs[n]), "--kept", str(out / f"kept{suffix}"), "--dropped", str(out / f"dropped{suffix}"),
                "--rejected", str(out / f"rejected{suffix}"), "--summary", str(out / "summary.json"), "--engine", engine]
        if actors is not None:
            args += ["--actors", str(actors), "--cpus-per-actor", "1"]
        run = _run(args, env)
        accounted = sum(_count(out / f"{part}{suffix}") for part in ("kept", "dropped", "rejected"))
        runs.append({"engine": engine, "actors": actors, "lines": n, "seconds": run["seconds"],
                     "lines_per_s": round(n / run["seconds"], 1), "peak_rss_mb": run["peak_rss_mb"],
                     "accounted": accounted, "all_accounted": accounted == n,
                     "of_core": round(n / run["seconds"] / core, 3)})
        print(json.dumps(runs[-1]), flush=True)
    local = {r["lines"]: r for r in runs if r["engine"] == "local"}
    flat = None
    if len(local) >= 2:
        small, large = local[min(local)], local[max(local)]
        flat = {"from": small["lines"], "to": large["lines"], "peak_rss_mb": [small["peak_rss_mb"], large["peak_rss_mb"]],
                "growth_mb": round(large["peak_rss_mb"] - small["peak_rss_mb"], 1)}
    save(name, {"command": "python -m bench.run bulk " + " ".join(sys.argv[2:]), "model": manifest.model_id,
                "embedding": manifest.embedding.as_dict(), "fit_seconds": round(fit_seconds, 1),
                "core_texts_per_s": round(core, 1), "runs": runs, "local_memory": flat,
                "target": "memory flat from 10k to 50k lines; lines/s within 10% of the core's (issue 17)"}, results)
