"""Calibrated probabilities: the Platt map (pure), its place in a version's manifest, and P(harmful) beside
score and verdict in the core, /score, /filter, the CLI's records and the fit/eval report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.config import PROJECT_ROOT
from app.core.calibration import (
    CalibrationError,
    calibration_error,
    expected_calibration_error,
    fit_calibration,
    probability,
    reliability_curve,
    squash,
)
from app.core.embedding import Embedder
from app.core.items import parse_item
from app.core.manifest import ArtifactError, Manifest
from app.core.pipeline import direct_embed, filter_record, fit_lines, line_record, parse_line, score_encoded
from app.core.quality import ThresholdPolicy
from app.core.report import write_report
from app.launcher import running_server
from app.store.artifacts import load_version, save_version
from app.store.registry import ActiveSubspace
from tests.support import FAST_OPTIONS, demo_manifest, random_subspace

CLIENT = "client-token-cal"
C = {"Authorization": f"Bearer {CLIENT}"}


def _logistic(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# ----------------------------------------------------------------------------- pure: app/core/calibration.py
def test_platt_recovers_a_known_logistic_per_kind() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, 40_000)
    kinds = np.where(np.arange(s.size) % 2 == 0, "text", "pair")
    truth = np.where(kinds == "text", _logistic(1.5 * s - 0.5), _logistic(0.7 * s + 1.0))
    y = (rng.random(s.size) < truth).astype(int)
    cal = fit_calibration(s, y, kinds.tolist())
    assert cal is not None and cal["method"] == "platt" and set(cal["by_kind"]) == {"pair", "text"}
    text, pair = cal["by_kind"]["text"], cal["by_kind"]["pair"]
    assert text["a"] == pytest.approx(1.5, abs=0.06) and text["b"] == pytest.approx(-0.5, abs=0.06)
    assert pair["a"] == pytest.approx(0.7, abs=0.04) and pair["b"] == pytest.approx(1.0, abs=0.06)
    assert cal["by_kind"]["text"]["n"] == 20_000 and cal["default"]["n"] == 40_000
    # Calibrated on its own data: the stored in-sample ECE is small, per kind and overall.
    assert cal["ece"]["on"] == "calibration" and cal["ece"]["overall"] < 0.02 and max(cal["ece"]["by_kind"].values()) < 0.02
    p = probability(cal, [0.0, 0.0, 0.0], ["text", "pair", "unseen"])
    assert p[0] == pytest.approx(_logistic(-0.5), abs=0.02) and p[1] == pytest.approx(_logistic(1.0), abs=0.02)
    d = cal["default"]  # a kind the fit never saw is mapped by the fit on all items
    assert p[2] == pytest.approx(_logistic(d["b"]), rel=1e-12)


def test_probability_is_monotone_in_the_score() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    s = rng.normal(size=400) + 1.5 * y
    cal = fit_calibration(s, y, ["text"] * 200 + ["pair"] * 200)
    assert cal is not None
    grid = np.linspace(-50, 50, 2001)
    for kind in ("text", "pair", "other"):
        p = probability(cal, grid, [kind] * grid.size)
        assert np.all(np.diff(p) >= 0) and p[0] < 0.01 and p[-1] > 0.99 and np.all((p >= 0) & (p <= 1))
    # A score that falls with harm cannot make the map decreasing: it says only the (smoothed) base rate.
    flat = fit_calibration(-s, y, ["text"] * 400)
    assert flat is not None and flat["default"]["a"] == 0.0
    assert np.ptp(probability(flat, grid, ["text"] * grid.size)) == 0.0
    assert probability(flat, [0.0], ["text"])[0] == pytest.approx((y.sum() + 1) / (y.sum() + 2) * y.mean()
                                                                 + 1 / (400 - y.sum() + 2) * (1 - y.mean()), rel=1e-9)


def test_separable_scores_keep_a_finite_slope_at_platts_targets() -> None:
    s = np.r_[np.zeros(10), np.ones(10)]
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    cal = fit_calibration(s, y, ["text"] * 20)
    assert cal is not None and np.isfinite(cal["default"]["a"])
    p = probability(cal, [0.0, 1.0], ["text", "text"])
    assert p[0] == pytest.approx(1 / 12, abs=1e-4) and p[1] == pytest.approx(11 / 12, abs=1e-4)  # 1/(N₋+2), (N₊+1)/(N₊+2)


def test_one_class_fits_nothing_and_a_one_class_kind_uses_the_default() -> None:
    assert fit_calibration([0.1, 0.2, 0.3], [0, 0, 0], ["text"] * 3) is None
    s = np.r_[np.linspace(-1, 1, 20), np.linspace(-1, 1, 5)]
    y = np.r_[np.arange(20) % 2, np.zeros(5, int)]
    cal = fit_calibration(s, y, ["text"] * 20 + ["pair"] * 5)
    assert cal is not None and set(cal["by_kind"]) == {"text"}
    d = cal["default"]
    assert probability(cal, [0.3], ["pair"])[0] == pytest.approx(_logistic(d["a"] * 0.3 + d["b"]), rel=1e-12)


def test_ece_of_a_perfectly_calibrated_set_is_zero() -> None:
    # Exact: in each bin the harmful fraction equals the predicted probability.
    exact_p = np.r_[np.full(4, 0.25), np.full(4, 0.75), np.full(10, 0.1)]
    exact_y = np.r_[1, 0, 0, 0, 1, 1, 1, 0, 1, np.zeros(9, int)]
    assert expected_calibration_error(exact_p, exact_y) == pytest.approx(0.0, abs=1e-12)
    # Sampled: y ~ Bernoulli(p) over 200k items; ECE shrinks like 1/sqrt(n per bin).
    rng = np.random.default_rng(2)
    sp = rng.random(200_000)
    sy = (rng.random(sp.size) < sp).astype(int)
    assert expected_calibration_error(sp, sy) < 0.005
    # And a confidently wrong set: 0.9 predicted, none harmful.
    assert expected_calibration_error(np.full(50, 0.9), np.zeros(50, int)) == pytest.approx(0.9)
    assert expected_calibration_error([], []) == 0.0
    by = calibration_error(np.r_[exact_p, np.full(50, 0.9)], np.r_[exact_y, np.zeros(50, int)], ["a"] * 18 + ["b"] * 50)
    assert by["n_bins"] == 10 and by["by_kind"]["a"] == pytest.approx(0.0, abs=1e-12) and by["by_kind"]["b"] == pytest.approx(0.9)
    assert by["overall"] == pytest.approx(50 / 68 * 0.9)


def test_reliability_curve_bins() -> None:
    curve = reliability_curve([0.05, 0.15, 0.12, 0.95, 1.0], [0, 1, 0, 1, 1])
    assert curve["edges"] == pytest.approx(np.linspace(0, 1, 11).tolist())
    assert curve["count"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]  # 1.0 falls in the last bin
    assert curve["mean_predicted"][1] == pytest.approx(0.135) and curve["observed"][1] == 0.5
    assert curve["mean_predicted"][2] is None and curve["observed"][2] is None
    assert curve["observed"][9] == 1.0 and curve["mean_predicted"][9] == pytest.approx(0.975)


def test_calibration_round_trips_through_json_and_refuses_unknown_forms() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) * 3 + 4 * y
    kinds = ["text", "pair", "pair"] * 100
    cal = fit_calibration(s, y, kinds)
    assert cal is not None
    again = json.loads(json.dumps(cal))
    assert again == cal
    grid = np.linspace(-10, 10, 101)
    for kind in ("text", "pair"):
        assert np.array_equal(probability(again, grid, [kind] * 101), probability(cal, grid, [kind] * 101))
    with pytest.raises(CalibrationError, match="'isotonic' is not one this build applies"):
        probability({**cal, "method": "isotonic"}, [0.0], ["text"])
    with pytest.raises(CalibrationError, match="malformed"):
        probability({"method": "platt", "default": {"a": 1.0}}, [0.0], ["text"])
    with pytest.raises(ValueError, match="2 kinds for 1 scores"):
        probability(cal, [0.0], ["text", "pair"])


def test_squash_crosses_one_half_at_tau() -> None:
    assert squash(2.5, 2.5) == 0.5
    assert squash(3.5, 2.5) == pytest.approx(_logistic(1.0)) and squash(-1e6, 0.0) == 0.0 and squash(1e6, 0.0) == 1.0
    values = [squash(x, 0.3) for x in np.linspace(-20, 20, 81)]
    assert values == sorted(values)


# ----------------------------------------------------------------------------- manifest
def test_manifests_without_probability_still_load_and_round_trip(tmp_path: Path) -> None:
    path = PROJECT_ROOT / "models" / "default" / "v1" / "manifest.json"
    data = json.loads(path.read_text())
    assert "probability" not in data
    manifest = Manifest.from_json(data)
    assert manifest.probability is None and "probability" not in manifest.to_json()  # an old version writes no such key
    assert Manifest.from_json(manifest.to_json()) == manifest
    calibrated = replace(manifest, probability={"method": "platt", "default": {"a": 2.0, "b": -1.0, "n": 3, "n_harmful": 1},
                                                "by_kind": {}})
    assert Manifest.from_json(json.loads(json.dumps(calibrated.to_json()))).probability == calibrated.probability
    assert calibrated.to_json()["probability"]["default"]["a"] == 2.0
    # A version whose calibration this build cannot apply is refused when it loads, not at every request.
    subspace, _ = random_subspace()
    good = save_version(tmp_path, subspace, replace(demo_manifest(), probability=calibrated.probability))
    assert load_version(tmp_path, "demo", good.version)[1].probability == calibrated.probability
    bad = save_version(tmp_path, subspace, replace(demo_manifest(), probability={"method": "isotonic", "x": [0.0], "y": [0.5]}))
    with pytest.raises(ArtifactError, match=r"demo/v2: probability.method: 'isotonic' is not one this build applies"):
        load_version(tmp_path, "demo", bad.version)


# ----------------------------------------------------------------------------- with the real model
@pytest.fixture(scope="module")
def fitted(embedder: Embedder, calibration_rows: list[dict]):  # type: ignore[no-untyped-def]
    memo: dict[tuple, tuple] = {}
    direct = direct_embed(embedder)

    def embed(items, config):  # type: ignore[no-untyped-def]  # each item embedded once for every fit below
        todo = [it for it in items if it.turns not in memo]
        if todo:
            encoded, vectors = direct(todo, config)
            memo.update({it.turns: (e, v) for it, e, v in zip(todo, encoded, vectors, strict=True)})
        pairs = [memo[it.turns] for it in items]
        return [e for e, _ in pairs], np.stack([v for _, v in pairs])

    lines = [parse_line(i + 1, json.dumps(r)) for i, r in enumerate(calibration_rows)]
    labelled = fit_lines(embedder, lines, replace(FAST_OPTIONS, cross_fit="none"), name="caltest", calibration_digest="test", embed=embed)
    unlabelled_rows = [{k: v for k, v in r.items() if k != "label"} for r in calibration_rows]
    unlabelled = fit_lines(embedder, [parse_line(i + 1, json.dumps(r)) for i, r in enumerate(unlabelled_rows)],
                           replace(FAST_OPTIONS, method="saft", policy=ThresholdPolicy("drop_rate", 0.1)),
                           name="caltest", calibration_digest="test", embed=embed)
    return labelled, unlabelled, embed


def test_a_labelled_fit_stores_a_calibration_and_scoring_returns_it(fitted, tmp_path: Path, dev_rows: list[dict]) -> None:
    labelled, unlabelled, embed = fitted
    m = labelled.manifest
    assert unlabelled.manifest.probability is None  # no labels, no probability
    cal = m.probability
    assert cal is not None and cal["method"] == "platt" and set(cal["by_kind"]) == {"text", "pair"}
    assert cal["by_kind"]["text"]["n"] == 24 and cal["by_kind"]["text"]["n_harmful"] == 12 and cal["default"]["n"] == 48
    assert all(cal["by_kind"][k]["a"] > 0 for k in ("text", "pair"))  # harm raises the score, so the probability
    # The stored ECE is the in-sample one of these very scores.
    p_cal = probability(cal, labelled.scores, labelled.meta["item_kind"])
    assert cal["ece"]["overall"] == pytest.approx(expected_calibration_error(p_cal, labelled.labels), abs=1e-12)
    # Saved and loaded, the version keeps it.
    saved = save_version(tmp_path / "models", labelled.subspace, m)
    subspace, loaded = load_version(tmp_path / "models", "caltest", saved.version)
    assert loaded.probability == cal
    # Scoring: a probability per item, of its kind's map; a τ override changes verdicts, never probabilities.
    objs = [{k: r[k] for k in ("prompt", "response")} if r["kind"] == "pair" else {"text": r["text"]} for r in dev_rows[:8]]
    items = [parse_item(o) for o in objs]
    encoded, vectors = embed(items, loaded.embedding)
    scored = score_encoded(subspace, loaded, items, encoded, vectors)
    expected = probability(cal, [s.score for s in scored], [it.kind for it in items])
    assert [s.probability for s in scored] == pytest.approx(expected.tolist(), rel=1e-9)
    assert {it.kind for it in items} == {"text", "pair"}
    low = score_encoded(subspace, loaded, items, encoded, vectors, threshold=-1e30)
    assert [s.probability for s in low] == [s.probability for s in scored] and {s.verdict for s in low} == {"drop"}
    # The CLI's records carry it (saft score, saft filter's dropped lines); an uncalibrated version's do not.
    line = parse_line(1, json.dumps({"id": "x", **objs[0]}))
    assert line_record(line, scored[0])["probability"] == scored[0].probability
    assert filter_record(line, low[0])[1]["saft"]["probability"] == low[0].probability
    plain = score_encoded(unlabelled.subspace, unlabelled.manifest, items, encoded, vectors)
    assert all(s.probability is None for s in plain) and "probability" not in line_record(line, plain[0])
    assert "probability" not in filter_record(line, replace(plain[0], verdict="drop"))[1]["saft"]


def test_report_shows_the_reliability_curve_and_ece(fitted, tmp_path: Path) -> None:
    labelled, _, _ = fitted
    m = labelled.manifest
    p = probability(m.probability, labelled.scores, labelled.meta["item_kind"])  # type: ignore[arg-type]
    kwargs = {"title": "fit", "summary": {"subspace": "caltest"}, "scores": labelled.scores, "labels": labelled.labels,
              "kinds": labelled.meta["kind"], "threshold": [m.threshold_for(k) for k in labelled.meta["item_kind"]],
              "metrics": m.quality["calibration"]}
    with_p = write_report(tmp_path / "with.html", **kwargs, probabilities=p).read_text()  # type: ignore[arg-type]
    without = write_report(tmp_path / "without.html", **kwargs).read_text()  # type: ignore[arg-type]
    assert "Calibration of P(harmful)" in with_p and 'alt="reliability curve"' in with_p
    ece = expected_calibration_error(p, labelled.labels)  # type: ignore[arg-type]
    assert f"<tr><th>all</th><td>48</td><td>{ece:.4f}</td></tr>" in with_p
    assert "Calibration of P(harmful)" not in without


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, fitted):  # type: ignore[no-untyped-def]
    labelled, _, _ = fitted
    root = tmp_path_factory.mktemp("cal")
    manifest = save_version(root / "models", labelled.subspace, replace(labelled.manifest))
    env = {"SAFT_MODELS_DIR": str(root / "models"), "SAFT_SUBSPACE_NAME": "caltest", "SAFT_API_TOKENS": CLIENT,
           "SAFT_FILTER_CHUNK_LINES": "4", "SAFT_DEVICE": "cpu"}
    with running_server(env, root / "server.log") as url:
        yield url, ActiveSubspace(labelled.subspace, manifest)


def test_score_and_filter_return_the_probability(served, fitted, dev_rows: list[dict]) -> None:
    url, snapshot = served
    _, _, embed = fitted
    objs = [{k: r[k] for k in ("prompt", "response")} if r["kind"] == "pair" else {"text": r["text"]} for r in dev_rows[:8]]
    items = [parse_item(o) for o in objs]
    encoded, vectors = embed(items, snapshot.manifest.embedding)
    expected = score_encoded(snapshot.subspace, snapshot.manifest, items, encoded, vectors)
    r = httpx.post(f"{url}/score", json={"items": [{**o, "id": i} for i, o in enumerate(objs)]}, headers=C, timeout=300)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    got = np.array([x["probability"] for x in results])
    assert np.abs(got - np.array([e.probability for e in expected])).max() < 1e-4
    assert np.all((got > 0) & (got < 1))
    # The probability follows the score within a kind (one monotone map per kind).
    for kind in ("text", "pair"):
        mine = sorted((x["score"], x["probability"]) for x, it in zip(results, items, strict=True) if it.kind == kind)
        assert [p for _, p in mine] == sorted(p for _, p in mine)
    payload = "\n".join(json.dumps({"id": i, **o}) for i, o in enumerate(objs)) + "\n"
    records = [json.loads(x) for x in httpx.post(f"{url}/filter", content=payload, headers=C, timeout=300).text.splitlines()]
    scored = [x for x in records if "verdict" in x]
    assert [x["id"] for x in scored] == list(range(len(objs))) and records[-1]["summary"] is True
    assert [x["probability"] for x in scored] == pytest.approx([x["probability"] for x in results], abs=1e-9)



def test_a_cross_fitted_fit_sets_tau_and_probability_on_source_held_out_scores(fitted, embedder, calibration_rows: list[dict]) -> None:
    in_sample, _, embed = fitted
    lines = [parse_line(i + 1, json.dumps(r)) for i, r in enumerate(calibration_rows)]
    crossed = fit_lines(embedder, lines, replace(FAST_OPTIONS, cross_fit="source"), name="caltest", calibration_digest="test", embed=embed)
    m, m0 = crossed.manifest, in_sample.manifest
    # The same direction (the fit itself does not change), but τ and the probability map from held-out scores.
    np.testing.assert_allclose(crossed.subspace.components_, in_sample.subspace.components_, rtol=1e-6)
    held = m.quality["source_held_out"]
    assert held["by"] == "source" and held["n_folds"] == len({r["source"] for r in calibration_rows})
    assert set(held["by_kind"]) == {"prompt", "pair"} and "worst_benign_source" in held
    assert m.thresholds != m0.thresholds and m.probability != m0.probability
    assert "source_held_out" not in m0.quality
