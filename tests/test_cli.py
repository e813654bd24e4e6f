"""The CLI end to end on the real model and real data: fit, score, filter, eval, sweep, model-cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.config import get_settings
from app.core.pipeline import FitOptions
from app.store.artifacts import list_versions, load_version
from tests.support import write_jsonl

runner = CliRunner()


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAFT_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("SAFT_SUBSPACE_NAME", "clitest")
    get_settings.cache_clear()
    yield tmp_path / "models"
    get_settings.cache_clear()


def _run(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1] if not result.stdout.strip().startswith("{\n") else result.stdout)


BAD_LINES = [
    "{not json",
    json.dumps({"text": "   "}),
    json.dumps({"prompt": 3, "response": "x"}),
    json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
    json.dumps(["a list"]),
]


@pytest.fixture
def fitted(models_dir: Path, tmp_path: Path, calibration_rows: list[dict]) -> dict:
    cal = write_jsonl(tmp_path / "cal.jsonl", calibration_rows)
    return _run(["fit", str(cal), "--layers", "8", "--pooling", "response", "--method", "lda", "--center", "kind",
                 "--max-length", "128", "--policy", "max_f1", "--report", str(tmp_path / "fit.html")])


def test_fit_publishes_a_version_with_provenance_and_report(fitted: dict, models_dir: Path, tmp_path: Path,
                                                            calibration_rows: list[dict]) -> None:
    assert fitted["version"] == "v1" and list_versions(models_dir, "clitest") == ["v1"]
    _subspace, manifest = load_version(models_dir, "clitest")
    assert manifest.calibration["n_samples"] == len(calibration_rows)
    assert manifest.calibration["counts"]["pair/1"] == 12
    assert len(manifest.calibration["sha256"]) == 64
    assert manifest.embedding.layers == (8,) and manifest.embedding.pooling == "response"
    assert manifest.method == "lda" and manifest.threshold_policy.kind == "max_f1"
    assert manifest.quality["calibration"]["overall"]["auroc"] > 0.9  # in-sample, a sanity floor
    html = (tmp_path / "fit.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "ROC" in html and "reliability curve" in html  # + calibration


def test_score_accounts_for_every_line(fitted: dict, tmp_path: Path, dev_rows: list[dict]) -> None:
    rows = [json.dumps(r) for r in dev_rows[:6]]
    data = write_jsonl(tmp_path / "in.jsonl", rows[:3] + BAD_LINES + rows[3:])
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["score", str(data), "-o", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 12))
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {4, 5, 6, 7, 8}
    assert errors[4].startswith("invalid JSON") and errors[5].startswith("text: is empty")
    assert errors[6].startswith("prompt: must be a string") and errors[7].startswith("messages[0].role")
    assert errors[8].startswith("item: must be a JSON object")
    good = [r for r in records if "error" not in r]
    assert all(r["verdict"] in ("keep", "drop") and isinstance(r["score"], float) and r["n_tokens"] > 0 for r in good)
    assert [r["id"] for r in good] == [r["id"] for r in dev_rows[:6]]
    # A per-call threshold override changes verdicts, not scores.
    low = tmp_path / "low.jsonl"
    runner.invoke(app, ["score", str(data), "-o", str(low), "--threshold", "-1e30"])
    assert all(json.loads(x).get("verdict", "drop") == "drop" for x in low.read_text().splitlines())


def test_filter_splits_every_line_into_one_file(fitted: dict, tmp_path: Path, dev_rows: list[dict]) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in dev_rows] + BAD_LINES)
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("kept", "dropped", "rejected")}
    summary = _run(["filter", str(data), *(x for n, p in paths.items() for x in (f"--{n}", str(p)))])
    lines = {name: p.read_text().splitlines() for name, p in paths.items()}
    assert summary["total"] == len(dev_rows) + len(BAD_LINES)
    assert summary["rejected"] == len(lines["rejected"]) == len(BAD_LINES)
    assert summary["kept"] == len(lines["kept"]) and summary["dropped"] == len(lines["dropped"])
    assert summary["kept"] + summary["dropped"] == len(dev_rows)
    assert summary["version"] == "v1"
    ids = {json.loads(x)["id"] for x in lines["kept"] + lines["dropped"]}
    assert ids == {r["id"] for r in dev_rows}
    kept_objs = [json.loads(x) for x in lines["kept"]]
    assert all(obj in dev_rows for obj in kept_objs), "kept lines are written unchanged"
    assert {json.loads(x)["line"] for x in lines["rejected"]} == set(range(len(dev_rows) + 1, len(dev_rows) + 6))


def test_eval_reports_per_kind_and_source(fitted: dict, tmp_path: Path, dev_rows: list[dict]) -> None:
    data = write_jsonl(tmp_path / "dev.jsonl", dev_rows)
    report = tmp_path / "eval.html"
    result = _run(["eval", str(data), "--report", str(report), "--json", str(tmp_path / "m.json")])
    metrics = result["metrics"]
    assert set(metrics["by_kind"]) == {"pair", "prompt"}
    assert {r["source"] for r in dev_rows} == set(metrics["by_source"])
    for key in ("auroc", "auprc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "precision", "recall", "f1"):
        assert 0.0 <= metrics["overall"][key] <= 1.0
    assert metrics["overall"]["n"] == len(dev_rows)
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == metrics
    assert report.read_text().count("data:image/png;base64,") == 3  # histograms, ROC/PR, reliability


def test_eval_rejects_unlabelled_lines_and_says_so(fitted: dict, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "dev.jsonl", [{"text": "hello", "label": 0}, {"text": "no label"}])
    result = runner.invoke(app, ["eval", str(data), "--report", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["rejected"] == {"count": 1, "lines": ["line 2: label: missing (eval needs label 0/1)"]}
    assert out["metrics"]["overall"]["n"] == 1
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}])
    result = runner.invoke(app, ["eval", str(only_bad)])
    assert result.exit_code == 2 and "no line can be evaluated" in result.output


def test_fit_errors_name_the_line(models_dir: Path, tmp_path: Path, calibration_rows: list[dict]) -> None:
    cal = write_jsonl(tmp_path / "cal.jsonl", ['{"text": ""}'] + [json.dumps(r) for r in calibration_rows[:10]] + ["{oops"])
    result = runner.invoke(app, ["fit", str(cal), "--layers", "2", "--max-length", "32", "--strict"])
    assert result.exit_code == 2
    assert "calibration line 1: text: is empty" in result.output
    assert list_versions(models_dir, "clitest") == [], "a failed fit publishes nothing"
    # Without --strict the bad lines are rejected, each listed with its reason in the manifest.
    out = _run(["fit", str(cal), "--layers", "2", "--max-length", "32"])
    assert out["rejected"]["count"] == 2
    assert out["rejected"]["lines"][0] == "line 1: text: is empty or whitespace only"
    assert out["rejected"]["lines"][1].startswith("line 12: invalid JSON")
    assert load_version(models_dir, "clitest")[1].calibration["n_samples"] == 10
    small = write_jsonl(tmp_path / "small.jsonl", calibration_rows[:5])
    result = runner.invoke(app, ["fit", str(small), "--layers", "2", "--max-length", "32", "--k", "8", "--method", "saft"])
    assert result.exit_code == 2 and "k=8 exceeds the rank" in result.output


def test_missing_subspace_is_a_clear_error(models_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hi"}])
    result = runner.invoke(app, ["score", str(data)])
    assert result.exit_code == 2 and "no subspace named 'clitest'" in result.output


def test_sweep_ranks_combinations(tmp_path: Path, calibration_rows: list[dict], dev_rows: list[dict]) -> None:
    cal = write_jsonl(tmp_path / "cal.jsonl", calibration_rows)
    dev = write_jsonl(tmp_path / "dev.jsonl", dev_rows)
    out = tmp_path / "sweep.json"
    best = _run(["sweep", str(cal), "--eval", str(dev), "--layers", "4;8;4,8", "--pooling", "last,response",
                 "--method", "saft,lda", "--k", "1,2", "--center", "kind", "--shrinkage", "0.5", "--max-length", "96",
                 "--json", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == 3 * 2 * (2 + 1)
    worst = [r["worst_kind_auroc"] for r in rows]
    assert worst == sorted(worst, reverse=True) and best == rows[0]
    assert set(rows[0]["by_kind"]) == {"pair", "prompt"}


def test_model_cache_reports_location(models_dir: Path) -> None:
    info = _run(["model-cache"])
    assert info["cache_dir"] == str(get_settings().model_cache_dir)
    assert any(e.startswith("smollm2-135m-instruct-") for e in info["entries"])


def test_fit_auto_picks_by_labels(models_dir: Path, tmp_path: Path, calibration_rows: list[dict]) -> None:
    labelled = write_jsonl(tmp_path / "l.jsonl", calibration_rows)
    unlabelled = write_jsonl(tmp_path / "u.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in calibration_rows])
    _run(["fit", str(labelled), "--layers", "4", "--max-length", "64"])
    # Unlabeled, beside an active labelled version: anchored on it (its verdicts label the data, τ carried over).
    anchored = _run(["fit", str(unlabelled), "--layers", "4", "--max-length", "64", "--activate", "never"])
    # The paper's unlabeled score on the data alone is asked for with --mode replace.
    _run(["fit", str(unlabelled), "--layers", "4", "--max-length", "64", "--k", "2", "--mode", "replace", "--activate", "never"])
    _, first = load_version(models_dir, "clitest", "v1")
    _, second = load_version(models_dir, "clitest", "v2")
    _, third = load_version(models_dir, "clitest", "v3")
    assert (first.method, first.threshold_policy.kind, first.threshold_policy.value) == ("lda", "fpr", 0.05)
    defaults = FitOptions()  # the CLI's defaults are FitOptions' (one place)
    assert (first.embedding.pooling, first.center, first.balance) == (defaults.embedding.pooling, defaults.center, defaults.balance)
    assert "calibration" in first.quality and first.quality["source_held_out"]["by"] == "source"  # labelled, with sources: cross-fitted
    assert second.method == "lda" and second.refit is not None and second.refit["strategy"] == "anchored"
    assert second.refit["prior"]["version"] == "v1" and anchored["refit"]["upload"]["pseudo_labelled"] == len(calibration_rows)
    assert anchored["active"] is False and anchored["held"] == ["activate=never"]
    assert (third.method, third.threshold_policy.kind, third.k) == ("saft", "drop_rate", 2)
    assert third.quality == {} and third.refit["strategy"] == "saft"  # nothing to measure without labels
    mixed = write_jsonl(tmp_path / "m.jsonl", calibration_rows[:5] + [{"text": "unlabelled"}])
    partly = _run(["fit", str(mixed), "--layers", "4", "--max-length", "64", "--activate", "never"])
    assert partly["refit"]["strategy"] == "partly labelled" and partly["refit"]["upload"]["labelled"] == 5
    result = runner.invoke(app, ["fit", str(mixed), "--layers", "4", "--max-length", "64", "--mode", "replace"])
    assert result.exit_code == 2 and "mixes labelled and unlabelled lines (line 6 differs" in result.output
