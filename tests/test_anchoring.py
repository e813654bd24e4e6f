"""Refits anchored on a version's stored statistics: the statistics reproduce the fit, the combination weighs an
upload as the sources it is given, τ and P(harmful) carry over, and the guard holds back what disagrees.

The math runs on synthetic Gaussian embeddings (numpy only, as the subspace math itself); the end-to-end refit
through the running service is in tests/test_api.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.core.anchoring import (
    AnchorWeights,
    GuardBounds,
    carry_probability,
    carry_thresholds,
    check_prior,
    combined_accumulator,
    compare,
    decide_activation,
    guard,
)
from app.core.calibration import probability
from app.core.embedding import EmbeddingConfig
from app.core.manifest import Manifest
from app.core.quality import ThresholdPolicy
from app.core.subspace import FitError, FitStatistics, MomentAccumulator, Subspace
from app.store.artifacts import load_version, save_version

D = 12


def _pool(rng: np.random.Generator, n_sources: int = 6, per: int = 150) -> tuple[np.ndarray, list[str], list[int], list[str]]:
    """Sources of texts and pairs, benign and harmful, each with its own offset (its 'format') and harm along e0."""
    X, kinds, labels, sources = [], [], [], []
    for s in range(n_sources):
        offset = rng.normal(0, 1.0, D)
        for label in (0, 1):
            kind = "pair" if s % 2 else "text"
            rows = rng.normal(0, 1, (per, D)) + offset + label * 2.5 * np.eye(D)[0]
            X.append(rows)
            kinds += [kind] * per
            labels += [label] * per
            sources += [f"s{s}"] * per
    return np.concatenate(X), kinds, labels, sources


def _lda() -> Subspace:
    return Subspace(method="lda", center="kind", shrinkage=0.5, balance="source")


def _fit(X: np.ndarray, kinds: list[str], labels: list[int], sources: list[str]) -> Subspace:
    acc = MomentAccumulator(D)
    acc.update(X, kinds, labels, sources)
    return _lda().fit_moments(acc)


@pytest.fixture(scope="module")
def fitted() -> tuple[Subspace, np.ndarray, list[str], list[int], list[str]]:
    X, kinds, labels, sources = _pool(np.random.default_rng(0))
    return _fit(X, kinds, labels, sources), X, kinds, labels, sources


def test_stored_statistics_reproduce_the_fit_through_a_saved_version(fitted, tmp_path: Path) -> None:
    sub, X, kinds, _labels, _sources = fitted
    manifest = Manifest(name="anchor", model_id="m", weights_digest="w", embedding=EmbeddingConfig(layers=(1,)),
                        method="lda", k=1, center="kind", standardize=True, shrinkage=0.5, signed=True, kinds=list(sub.kinds_),
                        threshold=1.0, threshold_policy=ThresholdPolicy("fpr", 0.05), calibration={"n_samples": len(X)},
                        balance="source")
    saved = save_version(tmp_path, sub, manifest)
    loaded, _ = load_version(tmp_path, "anchor", saved.version)
    stats = check_prior(loaded)
    assert stats.n_sources == {0: 6.0, 1: 6.0}
    refit = _lda().fit_moments(stats.accumulator())
    np.testing.assert_allclose(refit.score_samples(X, kinds), sub.score_samples(X, kinds), atol=1e-4)
    # Stored in float32 as upper triangles: d(d+1)/2 floats per (kind, label) cell.
    tensors = stats.to_tensors()
    assert tensors["statistics.pair.0.outer"].shape == (D * (D + 1) // 2,)
    assert FitStatistics.from_tensors({"components": np.zeros(1)}) is None  # a version saved without them


def test_a_prior_weighs_as_its_sources_and_the_upload_as_its_weight(fitted) -> None:
    sub, X, kinds, labels, sources = fitted
    stats = sub.statistics_
    rng = np.random.default_rng(1)
    # A seventh source, added as one source beside the stored six, equals the fit on all seven sources' rows.
    X7, k7, y7, _ = _pool(rng, n_sources=1, per=120)
    combined = _lda().fit_moments(combined_accumulator(stats, X7, k7, y7, [False] * len(y7), AnchorWeights(labelled=1.0)))
    direct = _fit(np.concatenate([X, X7]), kinds + k7, labels + y7, sources + ["s6"] * len(y7))
    np.testing.assert_allclose(combined.components_, direct.components_, atol=1e-5)
    # A heavier weight moves the direction further towards the upload's own discriminant.
    alone = _lda().fit(X7, k7, y7, ["u"] * len(y7))

    def cos(a: Subspace) -> float:
        return float(abs(a.components_[0] @ alone.components_[0]))

    heavy = _lda().fit_moments(combined_accumulator(stats, X7, k7, y7, [False] * len(y7), AnchorWeights(labelled=16.0)))
    assert cos(sub) < cos(combined) < cos(heavy)


def test_tau_and_probability_carry_over_to_the_new_score(fitted) -> None:
    sub, X, kinds, labels, _sources = fitted
    stats = sub.statistics_
    y = np.asarray(labels)
    rng = np.random.default_rng(2)
    Xu, ku, yu, _ = _pool(rng, n_sources=1, per=100)
    new = _lda().fit_moments(combined_accumulator(stats, Xu, ku, yu, [False] * len(yu), AnchorWeights(labelled=8.0)))
    # τ at the 95th percentile of the stored benign texts: the carried τ drops about the same share of them.
    benign_text = (y == 0) & (np.asarray(kinds) == "text")
    tau = float(np.quantile(sub.score_samples(X[benign_text], ["text"] * benign_text.sum()), 0.95))
    carried = carry_thresholds(sub, new, stats, {"text": tau})["text"]
    dropped = np.mean(new.score_samples(X[benign_text], ["text"] * benign_text.sum()) >= carried)
    assert abs(dropped - 0.05) < 0.02
    # P(harmful) of a new score is the old map's at the score it corresponds to.
    calibration = {"method": "platt", "default": {"a": 1.3, "b": -2.0}, "by_kind": {"text": {"a": 0.7, "b": -1.0}}}
    mapped = carry_probability(sub, new, stats, calibration)
    assert mapped["carried_from_prior"] is True
    p_new = probability(mapped, [carried], ["text"])[0]
    p_old = probability(calibration, [tau], ["text"])[0]
    assert p_new == pytest.approx(p_old, abs=1e-6)


def test_guard_holds_back_disagreement_and_lets_agreement_through() -> None:
    rng = np.random.default_rng(3)
    old = rng.normal(size=400)
    taus = np.full(400, 1.0)
    same = compare(old, taus, old + 0.01, taus)
    assert same["agreement"] > 0.98 and guard(same, GuardBounds()) == []
    unrelated = compare(old, taus, rng.normal(size=400), np.full(400, 1.5))
    reasons = guard(unrelated, GuardBounds())
    assert any("agree" in r for r in reasons) and any("drop" in r for r in reasons)
    # With labels, labelled quality decides: a refit that catches more harmful lines may drop more.
    y = (old > 0.8).astype(int)
    better = compare(old, taus, old + 2.0 * y, taus, y)
    assert guard(better, GuardBounds()) == [] and better["drop_share"]["new"] > better["drop_share"]["active"]
    worse = compare(old, taus, -old, taus, y)
    assert any("AUROC" in r for r in guard(worse, GuardBounds()))
    # The decision: never / always / first version / incomparable unlabeled fits are held.
    assert decide_activation("never", same, has_active=True, labelled=False, bounds=GuardBounds()) == (False, ["activate=never"])
    assert decide_activation("always", unrelated, has_active=True, labelled=False, bounds=GuardBounds())[0] is True
    assert decide_activation("auto", unrelated, has_active=False, labelled=False, bounds=GuardBounds())[0] is True
    assert decide_activation("auto", unrelated, has_active=True, labelled=False, bounds=GuardBounds())[0] is False
    held = decide_activation("auto", None, has_active=True, labelled=False, bounds=GuardBounds())
    assert held[0] is False and "cannot be compared" in held[1][0]


def test_a_prior_without_statistics_or_labels_cannot_anchor(fitted) -> None:
    sub, X, kinds, _labels, _sources = fitted
    bare = Subspace(method="lda")
    bare.__dict__.update({k: v for k, v in sub.__dict__.items() if k != "statistics_"})
    with pytest.raises(FitError, match="stores no calibration statistics"):
        check_prior(bare)
    saft = Subspace(method="saft", k=1).fit(X, kinds)
    with pytest.raises(FitError, match="not a labelled discriminant"):
        check_prior(saft)
