"""A refit that starts from what the active version knows: the prior's statistics plus the upload, the τ carried
over, and the comparison a guard decides activation by. numpy only, no I/O, no model.

Owns: combining a version's stored ``FitStatistics`` with an upload's embedded rows (labelled, pseudo-labelled by
the active version, or both), re-expressing the active version's per-kind τ on the new score's scale, and comparing
two versions on the upload. Must not: read files, embed, publish or activate (``app.core.pipeline`` and the service do).

Why this shape (docs/QUALITY.md, "Refit on your data"): a fit on an unlabeled upload alone (the paper's SAFT
score) is at chance on mixed data, and a discriminant fitted on a few hundred user lines alone forgets the
thousands of calibration lines behind the shipped version. Adding the upload as one more source beside the
stored sums keeps what was learned and lets the user's data move the direction by the weight it is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.metrics import roc_auc_score as auroc

from app.core.subspace import FitError, FitStatistics, MomentAccumulator, Subspace

UPLOAD = "upload"  # the source name an upload's rows take beside the prior's ("prior")


@dataclass(frozen=True)
class AnchorWeights:
    """How many of the prior's sources an upload's rows weigh as, within each label.

    ``labelled``: rows whose label the user gave; ``pseudo``: unlabeled rows labelled by the active version's
    verdict. The defaults are the measured ones (docs/reports/refit-r1/simulate.py).
    """

    labelled: float = 16.0
    pseudo: float = 0.1


def combined_accumulator(prior: FitStatistics, X: np.ndarray, kinds: Sequence[str], labels: Sequence[int],
                         pseudo: Sequence[bool], weights: AnchorWeights) -> MomentAccumulator:
    """The prior's sums with the upload's rows added as two sources: its labelled and its pseudo-labelled rows."""
    acc = prior.accumulator("prior")
    X = np.asarray(X, dtype=np.float64)
    pseudo_mask = np.asarray(pseudo, dtype=bool)
    for flag, source, weight in ((False, f"{UPLOAD}:labelled", weights.labelled), (True, f"{UPLOAD}:pseudo", weights.pseudo)):
        rows = np.flatnonzero(pseudo_mask == flag)
        if rows.size == 0 or weight <= 0:
            continue
        acc.update(X[rows], [kinds[i] for i in rows.tolist()], [int(labels[i]) for i in rows.tolist()], [source] * rows.size)
        for label in (0, 1):
            acc.source_weights[(label, source)] = weight
    return acc


def pseudo_labels(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """The active version's verdicts on the upload as labels (1: at or above its kind's τ)."""
    return (np.asarray(scores) >= np.asarray(taus)).astype(int)


def _class_score(subspace: Subspace, stats: FitStatistics, kind: str, label: int) -> tuple[float, float] | None:
    """Mean and standard deviation of ``subspace``'s score over a stored class (a linear score: exact moments)."""
    moments = stats.class_moments(kind, label)
    if moments is None or not subspace.signed_ or subspace.components_.shape[0] != 1:
        return None
    _, mean, cov = moments
    w = subspace.components_[0].astype(np.float64) / subspace.scale_.astype(np.float64) * float(subspace.singular_values_[0])
    center = subspace.centers_for([kind], 1)[0].astype(np.float64)
    return float(w @ (mean - center)), float(np.sqrt(max(w @ cov @ w, 0.0)))


def carry_thresholds(old: Subspace, new: Subspace, stats: FitStatistics, thresholds: Mapping[str, float]) -> dict[str, float]:
    """The active version's τ per kind re-expressed on the new score: the same number of standard deviations
    above the stored benign calibration mean, so the new version keeps the old one's false-positive calibration
    (a τ set at 5% FPR stays near 5% on calibration-like benign data). A kind without stored benign items keeps
    its τ."""
    out = {}
    for kind, tau in thresholds.items():
        before, after = _class_score(old, stats, kind, 0), _class_score(new, stats, kind, 0)
        if before is None or after is None or before[1] <= 0:
            out[kind] = float(tau)
            continue
        out[kind] = after[0] + (float(tau) - before[0]) / before[1] * after[1]
    return out


@dataclass(frozen=True)
class GuardBounds:
    """When a refit is published but not activated by itself (``activate=auto``)."""

    min_agreement: float = 0.9  # share of upload items on which the two versions' verdicts agree
    max_drop_ratio: float = 1.5  # the drop share may grow or shrink by this factor ...
    drop_slack: float = 0.02  # ... plus this many points (so 0.5% → 1.5% on a clean set is not a "move")
    max_auroc_loss: float = 0.01  # where the upload has labels: AUROC on them may fall by at most this


def compare(old_scores: np.ndarray, old_taus: np.ndarray, new_scores: np.ndarray, new_taus: np.ndarray,
            labels: np.ndarray | None = None) -> dict[str, Any]:
    """How two versions decide the same upload: agreement, the share each drops, and on its labelled lines
    (``labels`` 0/1, −1 where a line has none) the AUROC and the FPR / recall at each one's τ."""
    old_drop, new_drop = old_scores >= old_taus, new_scores >= new_taus
    out: dict[str, Any] = {
        "n": int(old_scores.shape[0]),
        "agreement": float(np.mean(old_drop == new_drop)) if old_scores.size else 1.0,
        "drop_share": {"active": float(np.mean(old_drop)) if old_scores.size else 0.0,
                       "new": float(np.mean(new_drop)) if new_scores.size else 0.0},
    }
    y = np.full(old_scores.shape[0], -1) if labels is None else np.asarray(labels, dtype=int)
    known = y >= 0
    if known.any():
        yk = y[known]
        out["n_labelled"] = int(known.sum())
        per = {}
        for name, scores, drop in (("active", old_scores[known], old_drop[known]), ("new", new_scores[known], new_drop[known])):
            entry: dict[str, float | None] = {"auroc": float(auroc(yk, scores)) if 0 < yk.sum() < yk.size else None}
            entry["fpr_at_threshold"] = float(drop[yk == 0].mean()) if (yk == 0).any() else None
            entry["recall_at_threshold"] = float(drop[yk == 1].mean()) if (yk == 1).any() else None
            per[name] = entry
        out["labelled"] = per
    return out


def carry_probability(old: Subspace, new: Subspace, stats: FitStatistics, calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The active version's P(harmful) map re-expressed on the new score, by the same affine map per kind as
    ``carry_thresholds`` (a Platt curve composed with an affine map is a Platt curve)."""
    out: dict[str, Any] = {k: v for k, v in calibration.items() if k not in ("by_kind", "ece")}
    out["carried_from_prior"] = True

    def mapped(entry: Mapping[str, Any], kind: str) -> dict[str, Any]:
        before, after = _class_score(old, stats, kind, 0), _class_score(new, stats, kind, 0)
        if before is None or after is None or after[1] <= 0:
            return dict(entry)
        ratio = before[1] / after[1]  # s_old = before_mean + (s_new − after_mean) · ratio
        a, b = float(entry["a"]), float(entry["b"])
        return {**entry, "a": a * ratio, "b": a * (before[0] - after[0] * ratio) + b}

    out["default"] = mapped(calibration["default"], "text")
    out["by_kind"] = {kind: mapped(entry, kind) for kind, entry in calibration.get("by_kind", {}).items()}
    return out


def guard(comparison: Mapping[str, Any], bounds: GuardBounds) -> list[str]:
    """The reasons not to activate a refit by itself (empty: activate).

    Where the upload has lines of both labels, they decide: the new version's AUROC on them may not fall, nor its
    FPR at τ rise, past the bounds (a labelled refit that catches more harmful lines drops more, as it should).
    Otherwise the verdicts decide: the two versions must agree on most of the upload and drop a similar share.
    """
    reasons = []
    labelled = comparison.get("labelled")
    if labelled and labelled["active"]["auroc"] is not None and labelled["new"]["auroc"] is not None:
        loss = labelled["active"]["auroc"] - labelled["new"]["auroc"]
        if loss > bounds.max_auroc_loss:
            reasons.append(f"its AUROC on the upload's labelled lines is {labelled['new']['auroc']:.3f} against the "
                           f"active version's {labelled['active']['auroc']:.3f} (bound: {bounds.max_auroc_loss:g} lower)")
        old, new = labelled["active"]["fpr_at_threshold"], labelled["new"]["fpr_at_threshold"]
        if new > old * bounds.max_drop_ratio + bounds.drop_slack:
            reasons.append(f"it would drop {new:.1%} of the upload's benign lines against the active version's {old:.1%} "
                           f"(bound ×{bounds.max_drop_ratio:g} + {bounds.drop_slack:.0%})")
        return reasons
    if comparison["agreement"] < bounds.min_agreement:
        reasons.append(f"its verdicts agree with the active version's on {comparison['agreement']:.1%} of the upload "
                       f"(bound {bounds.min_agreement:.0%})")
    old, new = comparison["drop_share"]["active"], comparison["drop_share"]["new"]
    if new > old * bounds.max_drop_ratio + bounds.drop_slack or new < old / bounds.max_drop_ratio - bounds.drop_slack:
        reasons.append(f"it would drop {new:.1%} of the upload against the active version's {old:.1%} "
                       f"(bound ×{bounds.max_drop_ratio:g} ± {bounds.drop_slack:.0%})")
    return reasons


Activation = Literal["auto", "always", "never"]


def decide_activation(activate: Activation, comparison: Mapping[str, Any] | None, *, has_active: bool, labelled: bool,
                      bounds: GuardBounds) -> tuple[bool, list[str]]:
    """Whether a published refit becomes active, and why not. ``auto``: the first version always; a refit compared
    with the active version on its upload when the guard finds no reason against it; a labelled refit that cannot
    be compared (another embedding) too; an unlabeled one that cannot be compared never (nothing vouches for it)."""
    if activate == "never":
        return False, ["activate=never"]
    if activate == "always" or not has_active:
        return True, []
    if comparison is None:
        if labelled:
            return True, []
        return False, [("an unlabeled refit with another embedding than the active version's cannot be compared with "
                        "it on the upload; activate it by hand after checking it, or pass activate=always")]
    reasons = guard(comparison, bounds)
    return not reasons, reasons


def check_prior(prior: Subspace) -> FitStatistics:
    """The statistics an anchored refit starts from, or a FitError saying why this version cannot be one."""
    stats = getattr(prior, "statistics_", None)
    if stats is None:
        raise FitError("the active version stores no calibration statistics (it predates them); refit with "
                       "mode=replace, or activate a version fitted since")
    if prior.method != "lda" or not {0, 1} <= {label for _, label in stats.sums}:
        raise FitError("the active version is not a labelled discriminant, so it cannot anchor a refit; use mode=replace")
    if prior.nuisance:
        raise FitError("the active version projects out nuisance directions, whose per-source means are not stored; "
                       "use mode=replace")
    return stats
