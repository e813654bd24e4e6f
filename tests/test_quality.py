"""Threshold policies mean what they say; quality metrics agree with their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.quality import ThresholdError, ThresholdPolicy, choose_threshold, grouped_quality, quality


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.2).astype(int)
    s = rng.normal(size=2000) + 1.5 * y
    return s, y


def test_fpr_policy_bounds_false_positives(scored) -> None:
    s, y = scored
    for target in (0.01, 0.05, 0.2):
        tau = choose_threshold(s, y, ThresholdPolicy("fpr", target))
        fpr = ((s > tau) & (y == 0)).sum() / (y == 0).sum()
        assert fpr <= target
        assert fpr > target - 2 / (y == 0).sum()  # as many drops as the budget allows


def test_recall_policy_reaches_recall(scored) -> None:
    s, y = scored
    tau = choose_threshold(s, y, ThresholdPolicy("recall", 0.9))
    recall = ((s > tau) & (y == 1)).sum() / y.sum()
    assert 0.9 <= recall < 0.9 + 2 / y.sum()


def test_drop_rate_policy_needs_no_labels(scored) -> None:
    s, _ = scored
    tau = choose_threshold(s, None, ThresholdPolicy("drop_rate", 0.1))
    assert abs((s > tau).mean() - 0.1) < 0.002


def test_max_f1_is_the_best_cut(scored) -> None:
    s, y = scored
    tau = choose_threshold(s, y, ThresholdPolicy("max_f1"))
    best = quality(y, s, tau)["f1"]
    for cut in np.quantile(s, np.linspace(0.5, 0.99, 60)):
        assert quality(y, s, cut)["f1"] <= best + 1e-12


def test_policy_errors() -> None:
    with pytest.raises(ThresholdError, match="needs a value"):
        ThresholdPolicy("fpr")
    with pytest.raises(ThresholdError, match="must be max_f1"):
        ThresholdPolicy.parse("median")
    with pytest.raises(ThresholdError, match="needs labels"):
        choose_threshold(np.arange(5.0), None, ThresholdPolicy("max_f1"))
    assert ThresholdPolicy.parse("fpr:0.05") == ThresholdPolicy("fpr", 0.05)


def test_quality_metrics_and_groups(scored) -> None:
    s, y = scored
    kinds = np.where(np.arange(len(y)) % 2, "pair", "prompt")
    report = grouped_quality(y, s, 0.5, {"kind": kinds})
    overall = report["overall"]
    assert 0.8 < overall["auroc"] < 0.9  # d' = 1.5 gives AUROC ≈ 0.86
    assert overall["tpr_at_1pct_fpr"] <= overall["tpr_at_5pct_fpr"] <= 1
    assert set(report["by_kind"]) == {"pair", "prompt"}
    assert report["by_kind"]["pair"]["n"] + report["by_kind"]["prompt"]["n"] == overall["n"]
    perfect = quality([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.5)
    assert perfect["auroc"] == 1.0 and perfect["f1"] == 1.0 and perfect["tpr_at_1pct_fpr"] == 1.0
