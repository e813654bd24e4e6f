"""A tiny smoke run of the benchmark harness, so it cannot rot (benchmarks themselves are not tests)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bench.run import app


def test_core_benchmark_smoke(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    results = tmp_path / "results.json"
    out = CliRunner().invoke(app, ["core", "--n", "6", "--layers", "2", "--max-length", "32", "--batch-sizes", "1,3",
                                   "--results", str(results)])
    assert out.exit_code == 0, out.output
    data = json.loads(results.read_text())["core-cpu"]
    assert [r["batch_size"] for r in data["by_batch_size"]] == [1, 3]
    assert data["matmul_gflops"] > 0 and data["blocks_run"] == 2
    assert all(r["tokens_per_s"] > 0 and 0 < r["fraction_of_matmul"] for r in data["by_batch_size"])
