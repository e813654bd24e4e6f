"""A tiny smoke run of every benchmark in the harness, so it cannot rot (benchmarks themselves are not tests).

The HTTP benchmarks run against the small embedded encoder (all-MiniLM-L6-v2) with a subspace fitted
for it by the peer benchmark's own fit step, so each server starts and answers in seconds. The peer
benchmark is driven with ``--peer saft`` (a second copy of this service through the same driver and
the same comparison code): Infinity itself lives in its own virtual environment, which CI lacks.
Values are checked for consistency (counts, ratios computed from their parts), never for speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.peer import SUBSPACE, fit_encoder_subspace
from bench.run import app

pytestmark = pytest.mark.slow


def invoke(results: Path, *args: str) -> dict:
    out = CliRunner().invoke(app, [*args, "--results", str(results)])
    assert out.exit_code == 0, f"{out.output}\n{out.exception!r}"
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def encoder_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("bench") / "models"
    models.mkdir()
    fitted = fit_encoder_subspace(models, 160)
    assert fitted["name"] == SUBSPACE and fitted["version"] == "v1"
    return models


@pytest.fixture
def encoder_env(encoder_models: Path) -> list[str]:
    return ["--env", "SAFT_MODEL=all-minilm-l6-v2", "--env", f"SAFT_MODELS_DIR={encoder_models}",
            "--env", f"SAFT_SUBSPACE_NAME={SUBSPACE}"]


def test_core_benchmark_smoke(tmp_path: Path) -> None:
    data = invoke(tmp_path / "r.json", "core", "--n", "6", "--layers", "2", "--max-length", "32", "--batch-sizes", "1,3",
                  "--token-budgets", "64", "--profile-batch", "2")["core-cpu"]
    assert [r["max_batch_size"] for r in data["by_batch_size"]] == [1, 3]
    assert [r["max_batch_tokens"] for r in data["by_token_budget"]] == [64]
    assert data["matmul_gflops"] > 0 and data["blocks_run"] == 2
    for r in data["by_batch_size"] + data["by_token_budget"]:
        # Both sides are rounded (GFLOP/s to 0.1, the fraction to 0.001).
        assert r["fraction_of_matmul"] == pytest.approx(r["gflops"] / data["matmul_gflops"], abs=0.06 / data["matmul_gflops"] + 0.001)
    shares = data["op_time_shares"]
    assert shares["matmul"] > 0 and shares["matmul"] + shares["attention"] + shares["other"] == pytest.approx(1, abs=0.005)


def test_service_benchmark_smoke(tmp_path: Path, encoder_env: list[str]) -> None:
    data = invoke(tmp_path / "r.json", "service", "--n", "6", "--concurrency", "1,3", *encoder_env)["service-vs-core"]
    assert data["model"] == "all-minilm-l6-v2" and data["subspace"] == f"{SUBSPACE}/v1"
    assert [r["concurrency"] for r in data["by_concurrency"]] == [1, 3]
    for r in data["by_concurrency"]:
        assert r["requests"] == 6 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["ratio_to_core"] == pytest.approx(r["texts_per_s"] / r["core_texts_per_s"], rel=0.01)
    assert len(data["core_runs_texts_per_s"]) == 3


def test_batching_benchmark_smoke(tmp_path: Path, encoder_env: list[str]) -> None:
    data = invoke(tmp_path / "r.json", "batching", "--n", "6", "--concurrency", "3", *encoder_env)["batching"]
    assert data["limits"]["off"]["max_batch_size"] == 1 and data["limits"]["on"]["max_batch_size"] > 1
    (row,) = data["by_concurrency"]
    assert row["speedup"] == pytest.approx(row["on_texts_per_s"] / row["off_texts_per_s"], rel=0.01)


def test_cache_benchmark_smoke(tmp_path: Path, encoder_env: list[str]) -> None:
    data = invoke(tmp_path / "r.json", "cache", "--n", "10", "--duplicates", "0.3", "--concurrency", "2", *encoder_env)["cache"]
    assert data["distinct"] == 7 and data["ideal_speedup"] == pytest.approx(10 / 7, rel=0.01)
    assert data["on"]["requests"] == data["off"]["requests"] == 10
    assert data["speedup"] == pytest.approx(data["on"]["texts_per_s"] / data["off"]["texts_per_s"], rel=0.01)


def test_peer_benchmark_smoke_against_our_own_service(tmp_path: Path, encoder_models: Path) -> None:
    data = invoke(tmp_path / "r.json", "peer", "--peer", "saft", "--n", "6", "--concurrency", "1,2",
                  "--models-dir", str(encoder_models))["peer-saft"]
    assert [r["concurrency"] for r in data["by_concurrency"]] == [1, 2]
    for r in data["by_concurrency"]:
        assert r["ratio"] == pytest.approx(r["saft_texts_per_s"] / r["peer_texts_per_s"], rel=0.01)


def test_layers_benchmark_smoke(tmp_path: Path) -> None:
    data = invoke(tmp_path / "r.json", "layers", "--n", "4", "--model", "all-minilm-l6-v2", "--layer", "3", "--repeats", "1")["layers"]
    assert (data["blocks_chosen"], data["blocks_full"], data["block_ratio"]) == (3, 6, 2.0)
    assert data["speedup"] > 0 and len(data["seconds"]["chosen"]) == len(data["seconds"]["full"]) == 1


def test_refit_benchmark_smoke(tmp_path: Path) -> None:
    data = invoke(tmp_path / "r.json", "refit", "--sizes", "600,2400", "--dim", "16", "--chunk", "256")["refit"]
    assert [r["n"] for r in data["by_n"]] == [600, 2400] and data["n_ratio_last_to_first"] == 4
    assert all(r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0 and r["seconds"] > 0 for r in data["by_n"])


def test_bulk_benchmark_smoke(tmp_path: Path) -> None:
    data = invoke(tmp_path / "r.json", "bulk", "--sizes", "60,120", "--ray-sizes", "60", "--ray-actors", "1",
                  "--fit-rows", "160")["bulk"]
    assert [(r["engine"], r["actors"], r["lines"]) for r in data["runs"]] == [("local", None, 60), ("local", None, 120),
                                                                              ("ray", 1, 60)]
    assert all(r["all_accounted"] and r["accounted"] == r["lines"] and r["peak_rss_mb"] > 0 for r in data["runs"])
    for r in data["runs"]:
        assert r["lines_per_s"] == pytest.approx(r["lines"] / r["seconds"], abs=0.06)
        assert r["of_core"] == pytest.approx(r["lines_per_s"] / data["core_texts_per_s"], rel=0.01, abs=0.002)
    memory = data["local_memory"]
    assert (memory["from"], memory["to"]) == (60, 120)
    assert memory["growth_mb"] == pytest.approx(memory["peak_rss_mb"][1] - memory["peak_rss_mb"][0], abs=0.11)


def test_gpu_benchmark_records_that_it_did_not_run_without_cuda(tmp_path: Path) -> None:
    import torch

    results = tmp_path / "r.json"
    out = CliRunner().invoke(app, ["gpu", "--n", "4", "--results", str(results)])
    data = json.loads(results.read_text())["gpu"]
    if torch.cuda.is_available():
        assert out.exit_code == 0, out.output
        assert data["dtype"] == "bfloat16" and data["matmul_gflops"] > 0
    else:  # recorded, and a failed exit with the reason: a prepared GPU script must not pass without measuring
        assert out.exit_code == 3 and "not run: no CUDA device" in out.output, out.output
        assert data["run"] is False and "no CUDA device" in data["reason"]


def test_plots_from_results(tmp_path: Path) -> None:
    results = tmp_path / "r.json"
    invoke(results, "refit", "--sizes", "300,600", "--dim", "8", "--chunk", "128")
    out = CliRunner().invoke(app, ["plots", "--results", str(results), "--out", str(tmp_path / "png")])
    assert out.exit_code == 0, out.output
    png = tmp_path / "png" / "refit.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantize_lever_reports_speed_and_score_change_on_the_committed_default(tmp_path: Path) -> None:
    data = invoke(tmp_path / "r.json", "quantize", "--n", "12", "--rounds", "1")["quantize"]
    assert data["subspace"].startswith("default/") and data["items"] == 12
    assert set(data["texts_per_s"]) == {"fp32", "int8"} and all(v > 0 for v in data["texts_per_s"].values())
    # int8 moves the scores (it is not the fp32 path) but stays in their range; the verdict count is bounded by the items
    assert 0 < data["max_abs_delta_score"] < 10 * data["median_abs_tau"] + 1
    assert 0 <= data["verdicts_flipped"] <= 12 and isinstance(data["kept"], bool)


def test_plain_loop_benchmark_compares_the_service_with_a_transformers_loop(tmp_path: Path) -> None:
    data = invoke(tmp_path / "r.json", "plain", "--n", "4", "--rounds", "1", "--concurrency", "2")["plain-loop"]
    assert data["loop"]["subspace"].startswith("default/") and data["loop"]["batch_size"] == 4
    assert len(data["runs"]["loop"]) == len(data["runs"]["service"]) == 1
    assert data["runs"]["service"][0]["requests"] == 4  # every text answered, one per request
    loop_rate = 4 / data["runs"]["loop"][0]["seconds"]
    assert data["loop_texts_per_s"] == pytest.approx(loop_rate, rel=1e-3)
    assert data["ratio_service_over_loop"] == pytest.approx(data["service_texts_per_s"] / data["loop_texts_per_s"], rel=1e-2)


def test_padding_mask_lever_compares_the_causal_pass_with_the_masked_one(tmp_path: Path) -> None:
    data = invoke(tmp_path / "r.json", "padding-mask", "--n", "8", "--rounds", "1")["padding-mask"]
    assert set(data["texts_per_s"]) == {"fp32", "no-mask"} and data["items"] == 8
    assert data["max_abs_delta_score"] < 1e-3 and data["verdicts_flipped"] == 0  # the same vectors, another kernel
    assert data["speedup"] == pytest.approx(sum(data["seconds"]["fp32"]) / sum(data["seconds"]["no-mask"]), rel=1e-2)


def test_threads_benchmark_compares_server_variants(tmp_path: Path, encoder_models: Path) -> None:
    base = f"SAFT_MODEL=all-minilm-l6-v2,SAFT_MODELS_DIR={encoder_models},SAFT_SUBSPACE_NAME={SUBSPACE}"
    data = invoke(tmp_path / "r.json", "threads", "--variant", f"default:{base}", "--variant",
                  f"passive:{base},OMP_WAIT_POLICY=PASSIVE", "--n", "6", "--concurrency", "2", "--rounds", "1")["threads"]
    rows = data["variants"]
    assert set(rows) == {"default", "passive"} and rows["passive"]["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert all(r["requests"] == 6 for r in rows.values()) and rows["default"]["ratio_to_default"] == 1.0
    assert rows["passive"]["ratio_to_default"] == pytest.approx(
        rows["passive"]["texts_per_s"] / rows["default"]["texts_per_s"], rel=0.02)
