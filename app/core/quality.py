"""Thresholds users can reason about, and detection quality (AUROC, AUPRC, TPR at FPR, P/R/F1).

numpy / scikit-learn only; no I/O. Label 1 means harmful; higher scores mean more harmful.

Owns: ``ThresholdPolicy``, choosing τ (``choose_threshold``, ``choose_thresholds``) and the quality metrics
(``quality``, ``grouped_quality``). Must not: read or write anything, or know the model, the subspace or items:
it sees labels and scores only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

PolicyKind = Literal["max_f1", "fpr", "recall", "drop_rate"]
LABEL_POLICIES = ("max_f1", "fpr", "recall")


class ThresholdError(ValueError):
    """A threshold policy that the calibration data cannot satisfy."""


@dataclass(frozen=True, slots=True)
class ThresholdPolicy:
    """How τ is chosen. ``value`` is the target FPR, recall, or drop rate (fraction in (0, 1))."""

    kind: PolicyKind = "max_f1"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("max_f1", "fpr", "recall", "drop_rate"):
            raise ThresholdError(f"threshold policy must be max_f1, fpr, recall or drop_rate, got {self.kind!r}")
        if self.kind != "max_f1" and (self.value is None or not 0.0 < self.value < 1.0):
            raise ThresholdError(f"threshold policy {self.kind!r} needs a value strictly between 0 and 1")

    @property
    def needs_labels(self) -> bool:
        return self.kind in LABEL_POLICIES

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> ThresholdPolicy:
        """'max_f1', 'fpr:0.05', 'recall:0.9', 'drop_rate:0.1'."""
        kind, _, value = text.partition(":")
        try:
            return cls(cast(PolicyKind, kind.strip()), float(value) if value else None)  # kind: checked by __post_init__
        except ValueError as err:
            raise ThresholdError(f"cannot parse threshold policy {text!r}: {err}") from None


def choose_threshold(scores: np.ndarray, labels: np.ndarray | None, policy: ThresholdPolicy) -> float:
    """τ such that items with score > τ are dropped, chosen by ``policy`` on calibration scores."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ThresholdError("no calibration scores to choose a threshold from")
    if policy.kind == "drop_rate":
        assert policy.value is not None  # __post_init__: every kind but max_f1 has a value
        return float(np.quantile(scores, 1.0 - float(policy.value)))
    if labels is None or len(set(np.asarray(labels).tolist())) < 2:
        raise ThresholdError(f"threshold policy {policy.kind!r} needs labels of both classes; use drop_rate:Q without labels")
    labels = np.asarray(labels, dtype=int)
    if policy.kind == "fpr":
        negatives = np.sort(scores[labels == 0])
        # Largest allowed count of negatives above τ, then τ at that order statistic.
        assert policy.value is not None
        allowed = int(np.floor(policy.value * negatives.size))
        return float(negatives[negatives.size - allowed - 1])
    if policy.kind == "recall":
        positives = np.sort(scores[labels == 1])
        assert policy.value is not None
        needed = int(np.ceil(policy.value * positives.size))
        # Just below the needed-th highest positive so that it is dropped (score > τ).
        return float(np.nextafter(positives[positives.size - needed], -np.inf))
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    tp = np.cumsum(sorted_labels)
    fp = np.cumsum(1 - sorted_labels)
    # Only cut between distinct scores.
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    f1 = np.where(last_of_run, 2 * tp / (tp + fp + labels.sum()), -1.0)
    best = int(np.argmax(f1))
    return float(sorted_scores[best + 1]) if best + 1 < scores.size else float(np.nextafter(sorted_scores[best], -np.inf))


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Highest true-positive rate whose false-positive rate does not exceed ``fpr``."""
    fprs, tprs, _ = roc_curve(labels, scores)
    return float(tprs[fprs <= fpr].max())


Thresholds = float | Sequence[float] | np.ndarray  # one τ, or each item's own (its kind's)


def quality(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: Thresholds) -> dict[str, Any]:
    """Ranking and verdict quality of ``scores`` against 0/1 ``labels``; NaN-free, JSON-ready."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    dropped = s > np.asarray(threshold, dtype=np.float64)
    tp = int((dropped & (y == 1)).sum())
    fp = int((dropped & (y == 0)).sum())
    fn = int((~dropped & (y == 1)).sum())
    out: dict[str, Any] = {
        "n": int(y.size),
        "n_harmful": int(y.sum()),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "drop_rate": float(dropped.mean()) if y.size else 0.0,
        "fpr_at_threshold": fp / int((y == 0).sum()) if (y == 0).any() else 0.0,
    }
    out["f1"] = 2 * out["precision"] * out["recall"] / (out["precision"] + out["recall"]) if tp else 0.0
    if 0 < y.sum() < y.size:
        out.update(
            auroc=float(roc_auc_score(y, s)),
            auprc=float(average_precision_score(y, s)),
            tpr_at_1pct_fpr=tpr_at_fpr(y, s, 0.01),
            tpr_at_5pct_fpr=tpr_at_fpr(y, s, 0.05),
        )
    return out


def grouped_quality(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: Thresholds,
    groups: dict[str, Sequence[str]],
) -> dict[str, Any]:
    """``quality`` overall and per value of each grouping (e.g. ``{"kind": [...], "source": [...]}``)."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), s.shape)
    report: dict[str, Any] = {"overall": quality(y, s, t)}
    for name, values in groups.items():
        arr = np.asarray(values)
        report[f"by_{name}"] = {str(v): quality(y[arr == v], s[arr == v], t[arr == v]) for v in sorted(set(arr.tolist()))}
    return report


def choose_thresholds(
    scores: np.ndarray, labels: np.ndarray | None, kinds: Sequence[str], policy: ThresholdPolicy
) -> tuple[float, dict[str, float]]:
    """The single τ over all items and one τ per item kind, each by ``policy`` on that kind's items.

    A kind the policy cannot be applied to (only one class among its items, say) gets no τ of its own
    and is decided by the single one.
    """
    overall = choose_threshold(scores, labels, policy)
    kinds_arr = np.asarray(kinds)
    by_kind: dict[str, float] = {}
    for kind in sorted(set(kinds_arr.tolist())):
        m = kinds_arr == kind
        try:
            by_kind[str(kind)] = choose_threshold(np.asarray(scores)[m], None if labels is None else np.asarray(labels)[m], policy)
        except ThresholdError:
            continue
    return overall, by_kind
