"""Refit scaling: time and peak memory of a streaming fit for growing N, one fresh process per N.

The embeddings are synthetic (the model's hidden size, two kinds, two labelled classes) because
embedding 200k texts on a laptop CPU takes hours and is measured elsewhere; what is measured here is
the fit itself: ``MomentAccumulator.update`` chunk by chunk, then ``Subspace.fit_moments``. Its
memory is O(groups · d²), so the peak RSS must not grow with N.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

# No torch here (bench.common imports it): the child's baseline RSS should be the fit's, not torch's.
RESULTS = Path(__file__).resolve().parent / "results.json"
ROOT = Path(__file__).resolve().parent.parent
ResultsOpt = Annotated[Path, typer.Option(help="Results file to merge into.")]


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process. Not getrusage's ru_maxrss: that survives execve, so a child
    would report its parent's peak (a benchmark process with torch loaded) instead of its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(n: int, dim: int, chunk: int) -> dict[str, float]:
    """Run in its own process: stream ``n`` synthetic embeddings through the accumulator, then fit."""
    import numpy as np

    from app.core.subspace import MomentAccumulator, Subspace

    rng = np.random.default_rng(0)
    direction = rng.standard_normal(dim).astype(np.float32)
    scales = np.exp(rng.normal(0, 1, dim)).astype(np.float32)  # a few huge dimensions, as in LLM hidden states
    baseline = _status_mb("VmRSS")
    acc = MomentAccumulator(dim)
    spent = 0.0
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = rng.integers(0, 2, m)
        kinds = np.where(rng.random(m) < 0.5, "text", "pair")
        X = rng.standard_normal((m, dim), dtype=np.float32) * scales + labels[:, None] * direction + (kinds == "pair")[:, None] * 0.5
        t0 = time.perf_counter()
        acc.update(X, kinds.tolist(), labels.tolist())
        spent += time.perf_counter() - t0
    t0 = time.perf_counter()
    Subspace(method="lda", center="kind", standardize=True, shrinkage=0.5).fit_moments(acc)
    fit_s = time.perf_counter() - t0
    return {"n": n, "accumulate_s": round(spent, 3), "fit_s": round(fit_s, 3), "seconds": round(spent + fit_s, 3),
            "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(_status_mb("VmHWM"), 1)}


def refit(
    sizes: Annotated[str, typer.Option(help="Sample counts N, one process each.")] = "10000,50000,200000",
    dim: Annotated[int, typer.Option(help="Embedding dimension (SmolLM2-135M's hidden size).")] = 576,
    chunk: Annotated[int, typer.Option(help="Rows per update (what the fit streams at once).")] = 4096,
    results: ResultsOpt = RESULTS,
) -> None:
    """Peak RSS and time of a streaming fit for each N; memory must stay flat in N."""
    from bench.common import save

    runs = []
    for n in (int(x) for x in sizes.split(",")):
        done = subprocess.run([sys.executable, "-m", "bench.refit", str(n), str(dim), str(chunk)], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        typer.echo(json.dumps(runs[-1]))
    first, last = runs[0], runs[-1]
    save("refit", {"command": "python -m bench.run refit", "dim": dim, "chunk": chunk, "by_n": runs,
                   "peak_rss_ratio_last_to_first": round(last["peak_rss_mb"] / first["peak_rss_mb"], 3),
                   "time_ratio_last_to_first": round(last["seconds"] / first["seconds"], 3),
                   "n_ratio_last_to_first": round(last["n"] / first["n"], 3)}, results)


if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
