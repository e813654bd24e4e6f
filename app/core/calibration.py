"""Calibrated probabilities: a monotone map from a version's score to P(harmful), per item kind.

Owns the fit of that map on labelled calibration scores, its JSON form (stored in a version's
manifest under ``"probability"``), applying it, and measuring calibration (reliability curve,
expected calibration error). numpy / scikit-learn only; no I/O, no models, no HTTP. It must not
decide verdicts: a verdict is ``score > τ`` whatever the probability says.

Why Platt scaling (a logistic curve in the score) rather than isotonic regression:

- The default method's score is a linear discriminant; for two classes with a shared covariance the
  posterior is exactly logistic in that score, so two numbers per kind are the right form, not a guess.
- Calibration sets hold tens to thousands of items per kind, and their scores are in-sample (the same
  items fitted the subspace), so they are more separated than on new data. Isotonic regression then
  learns a step function that says 0 or 1 across whole score ranges; Platt's smoothed targets
  ((N₊+1)/(N₊+2) and 1/(N₋+2)) keep the slope finite even on perfectly separated scores.
- A logistic curve is strictly increasing, so probability orders items as the score does (isotonic
  ties whole runs of scores), and it extrapolates to scores beyond the calibration range.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

METHOD = "platt"
N_BINS = 10


class CalibrationError(ValueError):
    """A stored calibration this build cannot apply (unknown method, malformed numbers)."""


def _sigmoid(z: np.ndarray | np.floating) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + e^-z), without overflow for large |z|


def _platt(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any] | None:
    """P(harmful | s) = sigmoid(a·s + b) by Platt's method, or None without both classes."""
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    # Platt's smoothed targets: a maximum-likelihood fit on them stays finite on separable scores.
    targets = np.where(labels == 1, (n_pos + 1) / (n_pos + 2), 1.0 / (n_neg + 2))
    mu = float(scores.mean())
    sd = float(scores.std()) or 1.0
    z = ((scores - mu) / sd)[:, None]  # standardized, so the solver's tolerance means the same at any score scale
    # Cross-entropy against soft targets = a weighted fit on each item once as harmful (weight t), once as benign (1 - t).
    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(
        np.vstack([z, z]), np.r_[np.ones(labels.size), np.zeros(labels.size)], sample_weight=np.r_[targets, 1.0 - targets]
    )
    a = float(fit.coef_[0, 0]) / sd
    b = float(fit.intercept_[0]) - a * mu
    if not a > 0.0:  # a score that does not rise with harm: keep the map monotone, say only the base rate
        mean = float(targets.mean())
        a, b = 0.0, float(np.log(mean / (1.0 - mean)))
    return {"a": a, "b": b, "n": int(labels.size), "n_harmful": n_pos}


def fit_calibration(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                    kinds: Sequence[str]) -> dict[str, Any] | None:
    """Fit score → P(harmful) per item kind on calibration items; JSON-ready, or None when the labels hold one class.

    The form: ``{"method": "platt", "default": {"a", "b", "n", "n_harmful"}, "by_kind": {kind: {...}}, "ece": {...}}``;
    a kind without both classes among its items (or one never seen) uses ``default``, fitted on all items.
    ``ece`` is measured on the same calibration items (in-sample: optimistic).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    k = np.asarray(kinds)
    default = _platt(s, y)
    if default is None:
        return None
    by_kind = {}
    for kind in sorted(set(k.tolist())):
        fitted = _platt(s[k == kind], y[k == kind])
        if fitted is not None:
            by_kind[str(kind)] = fitted
    calibration: dict[str, Any] = {"method": METHOD, "default": default, "by_kind": by_kind}
    calibration["ece"] = {"on": "calibration", **calibration_error(probability(calibration, s, k.tolist()), y, k.tolist())}
    return calibration


def calibration_error(probabilities: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                      groups: Sequence[str]) -> dict[str, Any]:
    """Expected calibration error overall and per group (e.g. item kind): ``{"n_bins", "overall", "by_kind"}``."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    g = np.asarray(groups)
    return {"n_bins": N_BINS, "overall": expected_calibration_error(p, y),
            "by_kind": {str(v): expected_calibration_error(p[g == v], y[g == v]) for v in sorted(set(g.tolist()))}}


def probability(calibration: dict[str, Any], scores: Sequence[float] | np.ndarray, kinds: Sequence[str]) -> np.ndarray:
    """P(harmful) of each score under a stored calibration, by its item kind's map (``default`` for other kinds)."""
    if calibration.get("method") != METHOD:
        raise CalibrationError(f"probability.method: {calibration.get('method')!r} is not one this build applies ({METHOD!r})")
    s = np.asarray(scores, dtype=np.float64)
    if s.size != len(kinds):
        raise ValueError(f"kinds: {len(kinds)} kinds for {s.size} scores")
    try:
        maps = {kind: (float(m["a"]), float(m["b"])) for kind, m in calibration.get("by_kind", {}).items()}
        default = (float(calibration["default"]["a"]), float(calibration["default"]["b"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CalibrationError(f"probability: malformed calibration ({type(err).__name__}: {err})") from None
    a = np.array([maps.get(kind, default)[0] for kind in kinds], dtype=np.float64)
    b = np.array([maps.get(kind, default)[1] for kind in kinds], dtype=np.float64)
    return _sigmoid(a * s + b)


def check(calibration: dict[str, Any]) -> None:
    """Raise ``CalibrationError`` unless this build can apply ``calibration`` (checked when a version loads)."""
    probability(calibration, [], [])


def squash(score: float, threshold: float) -> float:
    """A monotone map of a score into (0, 1) for versions without a calibration: sigmoid(score − τ).

    Not a probability: it only orders items as the score does and crosses 0.5 at τ, so ``> 0.5``
    agrees with the verdict.
    """
    return float(_sigmoid(np.float64(score) - np.float64(threshold)))


def _bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((p * n_bins).astype(int), n_bins - 1)  # equal-width bins on [0, 1], 1.0 in the last


def reliability_curve(probabilities: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                      n_bins: int = N_BINS) -> dict[str, list[Any]]:
    """Per equal-width probability bin: its edges, item count, mean predicted probability and observed
    harmful fraction (None where a bin is empty). A calibrated map has ``observed ≈ mean_predicted``."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    index = _bins(p, n_bins)
    count = np.bincount(index, minlength=n_bins)
    predicted = np.bincount(index, weights=p, minlength=n_bins)
    observed = np.bincount(index, weights=y, minlength=n_bins)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "mean_predicted": [float(predicted[i] / count[i]) if count[i] else None for i in range(n_bins)],
        "observed": [float(observed[i] / count[i]) if count[i] else None for i in range(n_bins)],
    }


def expected_calibration_error(probabilities: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                               n_bins: int = N_BINS) -> float:
    """Σ_bins (n_bin / N) · |observed harmful fraction − mean predicted probability| (0 for no items)."""
    curve = reliability_curve(probabilities, labels, n_bins)
    total = sum(curve["count"])
    if total == 0:
        return 0.0
    bins = zip(curve["count"], curve["observed"], curve["mean_predicted"], strict=True)
    return float(sum(n / total * abs(o - m) for n, o, m in bins if n))
