"""``saft filter --engine ray`` on a local Ray cluster: every line of every shard accounted for, with the
local engine's verdicts, scores (within float noise of other batch shapes) and records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app
from tests.support import write_jsonl

pytestmark = pytest.mark.slow
runner = CliRunner()

INVALID = ["{not json", json.dumps({"text": "   "}), json.dumps(["a list"]), json.dumps({"prompt": 3, "response": "x"})]


@pytest.fixture(scope="module")
def ray_cluster():  # type: ignore[no-untyped-def]
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, object_store_memory=96 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, dev_rows: list[dict]) -> Path:
    """Three shards of real dev lines, with invalid and blank lines mixed in (24 valid, 4 invalid, 2 blank)."""
    rows = [json.dumps(r) for r in dev_rows[:24]]
    root = tmp_path_factory.mktemp("shards")
    write_jsonl(root / "part-a.jsonl", rows[:6] + [INVALID[0], ""] + rows[6:10])
    write_jsonl(root / "part-b.jsonl", [INVALID[1]] + rows[10:19] + [INVALID[2]])
    write_jsonl(root / "part-c.jsonl", rows[19:22] + ["", INVALID[3]] + rows[22:24])
    (root / "notes.txt").write_text("not a shard\n")
    return root


def _records(path: Path) -> list[dict]:
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def _invoke(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.fixture(scope="module")
def ray_run(ray_cluster, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("ray-out")
    # 7 lines per actor call: batches straddle shard boundaries, so lines of two shards share a batch.
    summary = _invoke(["filter", str(shards), "--engine", "ray", "--actors", "1", "--batch-lines", "7",
                       *(x for name in ("kept", "dropped", "rejected", "scores") for x in (f"--{name}", str(out / name)))])
    return summary, out


@pytest.fixture(scope="module")
def local_runs(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """The local engine on each shard alone: the reference."""
    runs = {}
    for shard in sorted(shards.glob("*.jsonl")):
        out = tmp_path_factory.mktemp(f"local-{shard.stem}")
        summary = _invoke(["filter", str(shard), *(x for name in ("kept", "dropped", "rejected", "scores")
                                                   for x in (f"--{name}", str(out / f"{name}.jsonl")))])
        runs[str(shard.resolve())] = (summary, out)
    return runs


def test_every_line_of_every_shard_is_accounted_for(ray_run, shards: Path) -> None:  # type: ignore[no-untyped-def]
    summary, out = ray_run
    expected = {
        (str(shard.resolve()), n)
        for shard in shards.glob("*.jsonl")
        for n, raw in enumerate(shard.read_text().split("\n"), start=1)
        if raw.strip()
    }
    scores = _records(out / "scores")
    assert len(scores) == len(expected) == 28
    assert {(r["shard"], r["line"]) for r in scores} == expected
    assert summary["total"] == 28 and summary["rejected"] == len(INVALID) == 4
    assert summary["kept"] + summary["dropped"] == 24
    for bucket in ("kept", "dropped", "rejected"):
        assert len(_records(out / bucket)) == summary[bucket]
    verdicts = [r.get("verdict", "rejected") for r in scores]
    assert verdicts.count("keep") == summary["kept"] and verdicts.count("drop") == summary["dropped"]
    assert set(summary["shards"]) == {str(p.resolve()) for p in shards.glob("*.jsonl")}, "notes.txt is not a shard"
    assert sum(s["total"] for s in summary["shards"].values()) == 28
    # Output order is input order (preserve_order): shard by shard, line by line.
    assert [(r["shard"], r["line"]) for r in scores] == sorted(expected)


def test_scores_and_records_equal_the_local_engine(ray_run, local_runs) -> None:  # type: ignore[no-untyped-def]
    summary, out = ray_run
    local_scores = {(shard, r["line"]): r for shard, (_, lout) in local_runs.items() for r in _records(lout / "scores.jsonl")}
    ray_scores = {(r.pop("shard"), r["line"]): r for r in _records(out / "scores")}
    assert set(ray_scores) == set(local_scores)
    for key, mine in ray_scores.items():
        ref = local_scores[key]
        if "error" in ref:
            assert mine == ref, key
            continue
        assert mine["score"] == pytest.approx(ref["score"], rel=1e-4, abs=1e-4), key
        # Scores (and the probability, a function of them) differ by batch-mates' float noise only.
        assert mine.get("probability") == pytest.approx(ref.get("probability"), rel=1e-4, abs=1e-6), key
        numeric = ("score", "probability")
        assert {k: v for k, v in mine.items() if k not in numeric} == {k: v for k, v in ref.items() if k not in numeric}, key

    for bucket in ("kept", "dropped", "rejected"):
        assert summary[bucket] == sum(s[bucket] for s, _ in local_runs.values())
    for shard, (local_summary, _) in local_runs.items():
        assert summary["shards"][shard] == {k: local_summary[k] for k in ("total", "kept", "dropped", "rejected")}

    def canon(records: list[dict]) -> list[str]:
        return sorted(json.dumps(r, sort_keys=True) for r in records)

    local_kept = [r for _, lout in local_runs.values() for r in _records(lout / "kept.jsonl")]
    assert canon(_records(out / "kept")) == canon(local_kept), "kept lines are written unchanged"

    local_rejected = [{"shard": shard, **r} for shard, (_, lout) in local_runs.items() for r in _records(lout / "rejected.jsonl")]
    assert canon(_records(out / "rejected")) == canon(local_rejected)
    assert all(r["error"] for r in local_rejected)

    local_dropped = {(shard, r["saft"]["line"]): r for shard, (_, lout) in local_runs.items() for r in _records(lout / "dropped.jsonl")}
    ray_dropped = {(r["saft"]["shard"], r["saft"]["line"]): r for r in _records(out / "dropped")}
    assert set(ray_dropped) == set(local_dropped)
    for key, mine in ray_dropped.items():
        ref = local_dropped[key]
        assert mine["saft"]["score"] == pytest.approx(ref["saft"]["score"], rel=1e-4, abs=1e-4)
        assert mine["saft"].get("probability") == pytest.approx(ref["saft"].get("probability"), rel=1e-4, abs=1e-6)
        assert {k: v for k, v in mine.items() if k != "saft"} == {k: v for k, v in ref.items() if k != "saft"}


def test_ray_engine_refuses_unusable_inputs_and_outputs(shards: Path, tmp_path: Path) -> None:
    # Checked before any cluster starts.
    result = runner.invoke(app, ["filter", str(tmp_path / "nothing-*.jsonl"), "--engine", "ray"])
    assert result.exit_code == 2 and "matches a file" in result.output
    used = tmp_path / "kept"
    used.mkdir()
    (used / "part-00000.jsonl").write_text("{}\n")
    result = runner.invoke(app, ["filter", str(shards), "--engine", "ray", "--kept", str(used)])
    assert result.exit_code == 2 and "--kept" in result.output and "not an empty directory" in result.output
    result = runner.invoke(app, ["filter", str(shards)])
    assert result.exit_code == 2 and "needs --engine ray" in result.output
    result = runner.invoke(app, ["filter", str(shards), "--engine", "spark"])
    assert result.exit_code == 2 and "'spark'" in result.output


def test_ray_engine_refuses_gpus_the_cluster_lacks(ray_cluster, shards: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert not ray_cluster.cluster_resources().get("GPU")
    result = runner.invoke(app, ["filter", str(shards), "--engine", "ray", "--gpus-per-actor", "1", "--kept", str(tmp_path / "k"),
                                 "--dropped", str(tmp_path / "d"), "--rejected", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--gpus-per-actor 1: the Ray cluster has 0 GPU(s)" in result.output
