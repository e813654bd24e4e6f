"""The SAFT subspace: streaming moments, the fit, the one score function, thresholds. numpy only, no I/O.

Reads like scikit-learn's PCA: parameters in ``__init__``, ``fit`` returns self, learned state ends
in ``_``, ``score_samples`` scores, a clear error before fit, deterministic signs.

Every method produces the same stored form, so the service scores any of them with one projection:

    s(x) = (1/k) · Σ_j σ_j · g(⟨(f(x) − c(x)) / scale, v_j⟩)

with c(x) the calibration mean (of the item's kind when ``center="kind"``), ``scale`` the
per-dimension standard deviation (ones when ``standardize=False``), and g the square (the paper's
SAFT score, ``signed=False``) or the identity (a discriminant direction, ``signed=True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Method = Literal["saft", "lda"]
Centering = Literal["global", "kind"]
KINDS = ("text", "pair")
_MIN_SCALE = 1e-6


class FitError(ValueError):
    """The calibration data cannot support the requested fit (too few samples, k above rank, ...)."""


class NotFittedError(RuntimeError):
    """The subspace was used before ``fit``."""


@dataclass
class _Moments:
    """Sums about a fixed shift (for numerical stability with huge hidden dimensions)."""

    n: int
    s: np.ndarray  # Σ (f - shift), float64
    S: np.ndarray  # Σ (f - shift)(f - shift)ᵀ, float64


@dataclass
class MomentAccumulator:
    """Streaming sufficient statistics per (kind, label) group: count, Σf, Σffᵀ in float64.

    Memory is O(groups · d²), independent of the number of samples, so a fit streams.
    """

    dim: int
    shift: np.ndarray | None = None
    groups: dict[tuple[str, int | None], _Moments] = field(default_factory=dict)

    def update(self, X: np.ndarray, kinds: Sequence[str], labels: Sequence[int | None]) -> None:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise FitError(f"embeddings must have shape (n, {self.dim}), got {X.shape}")
        if not np.isfinite(X).all():
            raise FitError(f"embeddings contain NaN/inf in rows {np.flatnonzero(~np.isfinite(X).all(1)).tolist()}")
        if self.shift is None:
            self.shift = X.mean(axis=0)
        Xc = X - self.shift
        keys = list(zip(kinds, labels, strict=True))
        for key in set(keys):
            rows = Xc[[i for i, k in enumerate(keys) if k == key]]
            m = self.groups.get(key)
            if m is None:
                m = self.groups[key] = _Moments(0, np.zeros(self.dim), np.zeros((self.dim, self.dim)))
            m.n += rows.shape[0]
            m.s += rows.sum(axis=0)
            m.S += rows.T @ rows

    @property
    def n(self) -> int:
        return sum(m.n for m in self.groups.values())

    def counts(self) -> dict[str, int]:
        return {f"{kind}/{'unlabelled' if label is None else label}": m.n for (kind, label), m in sorted(self.groups.items(), key=str)}

    def kind_means(self) -> dict[str, np.ndarray]:
        """Mean of each kind (shifted coordinates)."""
        out: dict[str, np.ndarray] = {}
        for kind in {k for k, _ in self.groups}:
            parts = [m for (k, _), m in self.groups.items() if k == kind]
            out[kind] = sum(m.s for m in parts) / sum(m.n for m in parts)
        return out

    def scatter(self, centers: dict[str, np.ndarray], label: int | None | Literal["any"] = "any") -> tuple[int, np.ndarray, np.ndarray]:
        """(n, Σ(f − c), Σ(f − c)(f − c)ᵀ) over groups with ``label``, each kind about its center c."""
        n, s, S = 0, np.zeros(self.dim), np.zeros((self.dim, self.dim))
        for (kind, lab), m in self.groups.items():
            if label != "any" and lab != label:
                continue
            c = centers[kind]
            n += m.n
            s += m.s - m.n * c
            S += m.S - np.outer(m.s, c) - np.outer(c, m.s) + m.n * np.outer(c, c)
        return n, s, S


def _svd_flip(components: np.ndarray) -> np.ndarray:
    """Deterministic signs: each component's largest-magnitude entry is positive."""
    signs = np.sign(components[np.arange(components.shape[0]), np.abs(components).argmax(axis=1)])
    signs[signs == 0] = 1
    return components * signs[:, None]


class Subspace:
    """A fitted projection scorer (SAFT or discriminant), estimator-style.

    Parameters:
        k: number of directions (``method="saft"``); ``lda`` always yields one direction.
        method: "saft" is the paper's unsupervised score on the (possibly contaminated) calibration
            set; "lda" is a shrinkage linear discriminant between labelled classes, signed.
        center: "global" subtracts the calibration mean; "kind" subtracts the mean of the item's
            kind (text / pair), removing format variance before the SVD.
        standardize: divide each dimension by its calibration standard deviation (a few LLM
            hidden dimensions are orders of magnitude larger than the rest and would own the SVD).
        shrinkage: ridge weight (0..1) of the within-class covariance for "lda".
    """

    def __init__(
        self,
        k: int = 1,
        method: Method = "saft",
        center: Centering = "global",
        standardize: bool = True,
        shrinkage: float = 0.1,
    ) -> None:
        self.k = k
        self.method = method
        self.center = center
        self.standardize = standardize
        self.shrinkage = shrinkage

    # ----------------------------------------------------------------------------- fit
    def fit(self, X: np.ndarray, kinds: Sequence[str] | None = None, labels: Sequence[int | None] | None = None) -> Subspace:
        """Fit on an in-memory matrix; equivalent to streaming it through ``fit_moments``."""
        X = np.asarray(X)
        acc = MomentAccumulator(X.shape[1])
        acc.update(X, kinds or ["text"] * len(X), labels if labels is not None else [None] * len(X))
        return self.fit_moments(acc)

    def fit_moments(self, acc: MomentAccumulator) -> Subspace:
        """Fit from streamed moments: memory O(d²), whatever the number of calibration samples."""
        if self.method not in ("saft", "lda"):
            raise FitError(f"method must be 'saft' or 'lda', got {self.method!r}")
        if self.center not in ("global", "kind"):
            raise FitError(f"center must be 'global' or 'kind', got {self.center!r}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise FitError(f"shrinkage must be within [0, 1], got {self.shrinkage}")
        if self.k < 1:
            raise FitError(f"k must be at least 1, got {self.k}")
        n_total = acc.n
        if acc.shift is None or n_total < 2:
            raise FitError(f"calibration set has {n_total} samples; at least 2 are needed")
        d = acc.dim
        shift = acc.shift
        total_mean = sum(m.s for m in acc.groups.values()) / n_total  # shifted coordinates
        if self.center == "kind":
            centers = acc.kind_means()
        else:
            centers = {kind: total_mean for kind, _ in acc.groups}
        n, _, S = acc.scatter(centers)
        variances = np.clip(np.diag(S) / n, 0.0, None)
        scale = np.maximum(np.sqrt(variances), _MIN_SCALE) if self.standardize else np.ones(d)
        inv = 1.0 / scale

        if self.method == "saft":
            n_centers = len(centers) if self.center == "kind" else 1
            rank_bound = min(n - n_centers, d)
            if self.k > rank_bound:
                raise FitError(
                    f"k={self.k} exceeds the rank of the centered calibration matrix (at most {rank_bound} "
                    f"for {n} samples in {n_centers} center(s), dimension {d}); use a smaller k or more data"
                )
            gram = S * np.outer(inv, inv)  # FᵀF of the centered, standardized matrix
            eigvals, eigvecs = np.linalg.eigh(gram)
            order = np.argsort(eigvals)[::-1][: self.k]
            top = np.clip(eigvals[order], 0.0, None)
            if top[-1] <= 1e-10 * max(top[0], 1e-300):
                raise FitError(f"k={self.k} exceeds the numerical rank of the calibration matrix")
            components = _svd_flip(eigvecs[:, order].T)
            singular_values = np.sqrt(top)
            signed = False
        else:
            labelled = {lab for _, lab in acc.groups}
            if not {0, 1} <= labelled:
                raise FitError("method 'lda' needs labelled calibration data with both label 0 and label 1")
            if None in labelled:
                raise FitError("method 'lda' needs every calibration line labelled (found unlabelled lines)")
            stats = {lab: acc.scatter(centers, lab) for lab in (0, 1)}
            within = np.zeros((d, d))
            means = {}
            for lab, (n_c, s_c, S_c) in stats.items():
                means[lab] = s_c / n_c
                within += S_c - n_c * np.outer(means[lab], means[lab])
            within = within * np.outer(inv, inv) / n
            ridge = np.trace(within) / d
            cov = (1 - self.shrinkage) * within + self.shrinkage * ridge * np.eye(d)
            direction = np.linalg.solve(cov, (means[1] - means[0]) * inv)
            norm = float(np.linalg.norm(direction))
            if not np.isfinite(norm) or norm == 0.0:
                raise FitError("the two classes have identical means; no discriminant direction exists")
            components = (direction / norm)[None, :]
            singular_values = np.array([norm])
            signed = True

        self.kinds_ = tuple(sorted(centers))
        self.kind_means_ = np.stack([centers[k] + shift for k in self.kinds_]).astype(np.float32)
        self.mean_ = (total_mean + shift).astype(np.float32)
        self.scale_ = scale.astype(np.float32)
        self.components_ = components.astype(np.float32)
        self.singular_values_ = singular_values.astype(np.float32)
        self.signed_ = signed
        self.n_samples_ = n_total
        self.n_features_in_ = d
        return self

    # ----------------------------------------------------------------------------- score
    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise NotFittedError("this Subspace is not fitted yet; call fit() or load an artifact")

    def centers_for(self, kinds: Sequence[str] | None, n: int) -> np.ndarray:
        """Per-row centers: the kind's mean when centering by kind (global mean for unseen kinds)."""
        if self.center != "kind" or kinds is None:
            return np.broadcast_to(self.mean_, (n, self.n_features_in_))
        index = {k: i for i, k in enumerate(self.kinds_)}
        table = np.vstack([self.kind_means_, self.mean_[None, :]])
        return table[[index.get(k, len(self.kinds_)) for k in kinds]]

    def score_samples(self, X: np.ndarray, kinds: Sequence[str] | None = None) -> np.ndarray:
        """The one score function: s(x) = (1/k) Σ_j σ_j g(⟨(f(x) − c(x))/scale, v_j⟩); float64."""
        self._check_fitted()
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"embeddings must have shape (n, {self.n_features_in_}), got {X.shape}")
        Z = (X - self.centers_for(kinds, X.shape[0])) / self.scale_.astype(np.float64)
        proj = Z @ self.components_.astype(np.float64).T
        g = proj if self.signed_ else proj**2
        return (g * self.singular_values_.astype(np.float64)).sum(axis=1) / self.components_.shape[0]
