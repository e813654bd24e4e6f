"""The SAFT subspace: streaming moments, the fit, the one score function. numpy only, no I/O.

Owns: ``MomentAccumulator``, ``FitStatistics``, ``Subspace`` (fit, ``score_samples``, its parameters and tensors) and
``FitError``. Must not: import torch, transformers or the embedder (an import-linter contract), read or write files
(``app.store.artifacts`` stores its tensors), or choose τ (``app.core.quality`` does).

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
from typing import Literal, TypedDict

import numpy as np

Method = Literal["saft", "lda"]
Centering = Literal["global", "kind"]
Balance = Literal["item", "source"]


class SubspaceParams(TypedDict):
    """``Subspace.get_params()``: the constructor's keyword arguments."""

    k: int
    method: Method
    center: Centering
    standardize: bool
    shrinkage: float
    balance: Balance
    nuisance: int
_MIN_SCALE = 1e-6


class FitError(ValueError):
    """The calibration data cannot support the requested fit (too few samples, k above rank, ...)."""


class NotFittedError(RuntimeError):
    """The subspace was used before ``fit``."""


@dataclass
class _Moments:
    """Sums about a fixed shift (for numerical stability with huge hidden dimensions)."""

    n: float  # a count; a prior's cells (``FitStatistics.accumulator``) hold weighted counts
    s: np.ndarray  # Σ (f - shift), float64
    S: np.ndarray  # Σ (f - shift)(f - shift)ᵀ, float64


Cell = tuple[str, int | None, str]  # (item kind, label, source)


@dataclass
class MomentAccumulator:
    """Streaming sufficient statistics per (kind, label, source) cell: count, Σf, Σffᵀ in float64.

    Memory is O(cells · d²), independent of the number of samples, so a fit streams. The source is the
    line's own ``source`` field ("" where it has none): one cell per source lets a fit weigh every source
    alike, and a cross-validation drop whole sources without re-reading the data.
    """

    dim: int
    shift: np.ndarray | None = None
    groups: dict[Cell, _Moments] = field(default_factory=dict)
    max_cells: int = 512  # each cell holds d² float64 sums (2.7 MB at d = 576)
    #: How many sources a (label, source) stands for under ``balance="source"`` (1 where absent): a stored prior
    #: weighs as the sources it averaged, an upload as the weight a refit gives it.
    source_weights: dict[tuple[int | None, str], float] = field(default_factory=dict)

    def update(self, X: np.ndarray, kinds: Sequence[str], labels: Sequence[int | None], sources: Sequence[str] | None = None,
               *, remove: bool = False) -> None:
        """Add rows to their cells (``remove``: take rows added before back out, e.g. a fold's near-duplicates)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise FitError(f"embeddings must have shape (n, {self.dim}), got {X.shape}")
        if not np.isfinite(X).all():
            raise FitError(f"embeddings contain NaN/inf in rows {np.flatnonzero(~np.isfinite(X).all(1)).tolist()}")
        if self.shift is None:
            self.shift = X.mean(axis=0)
        Xc = X - self.shift
        keys = list(zip(kinds, labels, sources if sources is not None else [""] * len(X), strict=True))
        sign = -1 if remove else 1
        for key in set(keys):
            rows = Xc[[i for i, k in enumerate(keys) if k == key]]
            m = self.groups.get(key)
            if m is None:
                if remove:
                    raise FitError(f"cannot remove rows of {key}: none were added")
                if len(self.groups) >= self.max_cells:
                    raise FitError(f"more than {self.max_cells} distinct (kind, label, source) groups in the calibration "
                                   "set; weigh items alike (balance=item) or give fewer distinct 'source' values")
                m = self.groups[key] = _Moments(0, np.zeros(self.dim), np.zeros((self.dim, self.dim)))
            if remove and rows.shape[0] > m.n:
                raise FitError(f"cannot remove {rows.shape[0]} rows of {key}: it holds {m.n}")
            if remove and rows.shape[0] == m.n:
                del self.groups[key]
                continue
            m.n += sign * rows.shape[0]
            m.s += sign * rows.sum(axis=0)
            m.S += sign * (rows.T @ rows)

    def minus(self, X: np.ndarray, kinds: Sequence[str], labels: Sequence[int | None], sources: Sequence[str]) -> MomentAccumulator:
        """These statistics less the given rows (added before); only the cells they touch are copied."""
        keys = set(zip(kinds, labels, sources, strict=True))
        groups = {key: (_Moments(m.n, m.s.copy(), m.S.copy()) if key in keys else m) for key, m in self.groups.items()}
        out = MomentAccumulator(self.dim, self.shift, groups, self.max_cells, dict(self.source_weights))
        out.update(X, kinds, labels, sources, remove=True)
        return out

    @property
    def n(self) -> int:
        return round(sum(m.n for m in self.groups.values()))

    def counts(self) -> dict[str, int]:
        """Samples per ``kind/label`` (sources summed)."""
        out: dict[str, float] = {}
        for (kind, label, _), m in self.groups.items():
            key = f"{kind}/{'unlabelled' if label is None else label}"
            out[key] = out.get(key, 0) + m.n
        return {key: round(n) for key, n in sorted(out.items())}

    def source_counts(self) -> dict[str, int]:
        out: dict[str, float] = {}
        for (_, _, source), m in self.groups.items():
            out[source] = out.get(source, 0) + m.n
        return {key: round(n) for key, n in sorted(out.items())}

    def without(self, sources: set[str]) -> MomentAccumulator:
        """The statistics of every cell but those of ``sources`` (a fold of a source-held-out evaluation)."""
        kept = {key: m for key, m in self.groups.items() if key[2] not in sources}
        return MomentAccumulator(self.dim, self.shift, kept, self.max_cells, dict(self.source_weights))

    def weights(self, balance: Balance) -> dict[Cell, float]:
        """Per-sample weight of each cell: 1 ("item"), or such that every source carries the same total
        weight within its label while each label keeps its total ("source"); a source standing for ω sources
        (``source_weights``) carries ω times that (under "item", each of its samples weighs ω)."""
        if balance == "item":
            return {key: self.source_weights.get((key[1], key[2]), 1.0) for key in self.groups}
        totals, per_source, n_sources = self._label_totals()
        return {
            (kind, label, source): totals[label] * self.source_weights.get((label, source), 1.0)
            / n_sources[label] / per_source[(label, source)]
            for (kind, label, source) in self.groups
        }

    def _label_totals(self) -> tuple[dict[int | None, float], dict[tuple[int | None, str], float], dict[int | None, float]]:
        """Per label: the count; per (label, source): the count; per label: the sources it holds, weighted."""
        totals: dict[int | None, float] = {}
        per_source: dict[tuple[int | None, str], float] = {}
        for (_, label, source), m in self.groups.items():
            totals[label] = totals.get(label, 0) + m.n
            per_source[(label, source)] = per_source.get((label, source), 0) + m.n
        n_sources: dict[int | None, float] = {}
        for label, source in per_source:
            n_sources[label] = n_sources.get(label, 0.0) + self.source_weights.get((label, source), 1.0)
        return totals, per_source, n_sources


Sums = dict[tuple[str, int | None], tuple[float, np.ndarray, np.ndarray]]


@dataclass
class FitStatistics:
    """What a fit summed, kept with its version so a later fit can add data to it without the original lines.

    Per (kind, label): the weighted count, Σ w·(f − shift) and Σ w·(f − shift)(f − shift)ᵀ under the fit's
    balance, and per label how many sources they average. Fitting the same parameters on ``accumulator()``
    reproduces the fit; adding an upload's rows to it as a source of its own weighs the stored calibration as
    the sources it came from, the upload as one (or the weight a refit gives it).
    """

    shift: np.ndarray  # (d,) float64
    sums: Sums
    n_sources: dict[int | None, float]

    def accumulator(self, source: str = "prior", max_cells: int = 512) -> MomentAccumulator:
        """These sums as the cells of one source that stands for the sources they averaged."""
        dim = int(self.shift.shape[0])
        groups = {(kind, label, source): _Moments(n, s.astype(np.float64), S.astype(np.float64))
                  for (kind, label), (n, s, S) in self.sums.items()}
        weights = {(label, source): float(n) for label, n in self.n_sources.items()}
        return MomentAccumulator(dim, self.shift.astype(np.float64), groups, max_cells, weights)

    def class_moments(self, kind: str, label: int | None) -> tuple[float, np.ndarray, np.ndarray] | None:
        """(weighted count, mean, covariance) of one cell in the original coordinates; None where it is empty."""
        if (kind, label) not in self.sums:
            return None
        n, s, S = self.sums[(kind, label)]
        if n <= 0:
            return None
        mean = s / n
        return n, mean + self.shift, S / n - np.outer(mean, mean)

    def to_tensors(self, prefix: str = "statistics.") -> dict[str, np.ndarray]:
        """float32 arrays (Σffᵀ as its upper triangle): 4 cells at d = 576 take 2.7 MB."""
        d = int(self.shift.shape[0])
        iu = np.triu_indices(d)
        out = {f"{prefix}shift": self.shift.astype(np.float32)}
        for (kind, label), (n, s, S) in sorted(self.sums.items(), key=lambda t: (t[0][0], -1 if t[0][1] is None else t[0][1])):
            key = f"{prefix}{kind}.{'none' if label is None else label}"
            out[f"{key}.n"] = np.asarray([n], dtype=np.float64)
            out[f"{key}.sum"] = s.astype(np.float64)
            out[f"{key}.outer"] = S[iu].astype(np.float32)
        for label, n in self.n_sources.items():
            out[f"{prefix}n_sources.{'none' if label is None else label}"] = np.asarray([n], dtype=np.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], prefix: str = "statistics.") -> FitStatistics | None:
        """The statistics stored by ``to_tensors``; None for a version saved without them."""
        if f"{prefix}shift" not in tensors:
            return None
        shift = tensors[f"{prefix}shift"].astype(np.float64)
        d = int(shift.shape[0])
        iu = np.triu_indices(d)
        sums: Sums = {}
        n_sources: dict[int | None, float] = {}
        for name in tensors:
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split(".")
            if parts[0] == "n_sources":
                n_sources[None if parts[1] == "none" else int(parts[1])] = float(tensors[name][0])
            elif len(parts) == 3 and parts[2] == "n":
                kind, label = parts[0], None if parts[1] == "none" else int(parts[1])
                key = f"{prefix}{parts[0]}.{parts[1]}"
                S = np.zeros((d, d))
                S[iu] = tensors[f"{key}.outer"]
                S = S + np.triu(S, 1).T
                sums[(kind, label)] = (float(tensors[name][0]), tensors[f"{key}.sum"].astype(np.float64), S)
        return cls(shift, sums, n_sources)


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
        balance: "item" weighs every calibration sample alike; "source" gives every source the same
            total weight within its label, so a large source cannot define a class (what a discriminant
            then learns is harm, not which benchmark an item comes from).
        nuisance: for "lda", the number of directions along which the benign sources' means differ
            (format, topic, provenance) that are projected out before the discriminant; 0 keeps all.
    """

    # Set by fit_moments, or on load (None for a version saved without them); unset before a fit.
    statistics_: FitStatistics | None

    def __init__(
        self,
        k: int = 1,
        method: Method = "saft",
        center: Centering = "global",
        standardize: bool = True,
        shrinkage: float = 0.1,
        balance: Balance = "item",
        nuisance: int = 0,
    ) -> None:
        self.k = k
        self.method = method
        self.center = center
        self.standardize = standardize
        self.shrinkage = shrinkage
        self.balance = balance
        self.nuisance = nuisance

    def get_params(self) -> SubspaceParams:
        """The constructor's parameters (as scikit-learn's ``get_params``): what a manifest stores."""
        return {"k": self.k, "method": self.method, "center": self.center, "standardize": self.standardize,
                "shrinkage": self.shrinkage, "balance": self.balance, "nuisance": self.nuisance}

    #: The fitted arrays a version stores (safetensors names = attribute names without the trailing underscore).
    ARRAYS = ("components", "singular_values", "mean", "kind_means", "scale")

    def to_tensors(self) -> dict[str, np.ndarray]:
        """The fitted arrays and, where the fit kept them, its calibration statistics (``FitStatistics``): what a
        version's ``subspace.safetensors`` holds. ``from_tensors`` reads them back."""
        self._check_fitted()
        stats = getattr(self, "statistics_", None)
        return {**{name: getattr(self, f"{name}_") for name in self.ARRAYS}, **(stats.to_tensors() if stats is not None else {})}

    @classmethod
    def from_tensors(cls, params: SubspaceParams, tensors: dict[str, np.ndarray], *, kinds: Sequence[str], signed: bool,
                     n_samples: int) -> Subspace:
        """A fitted subspace from ``to_tensors``' arrays and what its manifest records (the parameters, the kinds it
        was fitted on, whether scores are signed). Raises ``FitError`` naming what is missing or malformed."""
        missing = sorted(set(cls.ARRAYS) - set(tensors))
        if missing:
            raise FitError(f"the stored arrays lack {missing}")
        subspace = cls(**params)
        for name in cls.ARRAYS:
            setattr(subspace, f"{name}_", tensors[name])
        subspace.kinds_ = tuple(kinds)
        subspace.signed_ = signed
        subspace.n_features_in_ = int(tensors["mean"].shape[0])
        subspace.n_samples_ = n_samples
        try:
            subspace.statistics_ = FitStatistics.from_tensors(tensors)
        except (KeyError, ValueError) as err:
            raise FitError(f"the stored calibration statistics are malformed ({err})") from None
        return subspace

    # ----------------------------------------------------------------------------- fit
    def fit(self, X: np.ndarray, kinds: Sequence[str] | None = None, labels: Sequence[int | None] | None = None,
            sources: Sequence[str] | None = None) -> Subspace:
        """Fit on an in-memory matrix; equivalent to streaming it through ``fit_moments``."""
        X = np.asarray(X)
        acc = MomentAccumulator(X.shape[1])
        acc.update(X, kinds or ["text"] * len(X), labels if labels is not None else [None] * len(X), sources)
        return self.fit_moments(acc)

    def _check_params(self) -> None:
        if self.method not in ("saft", "lda"):
            raise FitError(f"method must be 'saft' or 'lda', got {self.method!r}")
        if self.center not in ("global", "kind"):
            raise FitError(f"center must be 'global' or 'kind', got {self.center!r}")
        if self.balance not in ("item", "source"):
            raise FitError(f"balance must be 'item' or 'source', got {self.balance!r}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise FitError(f"shrinkage must be within [0, 1], got {self.shrinkage}")
        if self.k < 1:
            raise FitError(f"k must be at least 1, got {self.k}")
        if self.nuisance < 0:
            raise FitError(f"nuisance must be 0 or more, got {self.nuisance}")

    def fit_moments(self, acc: MomentAccumulator) -> Subspace:
        """Fit from streamed moments: memory O(d²), whatever the number of calibration samples."""
        self._check_params()
        n_total = acc.n
        if acc.shift is None or n_total < 2:
            raise FitError(f"calibration set has {n_total} samples; at least 2 are needed")
        d = acc.dim
        shift = acc.shift
        weight = acc.weights(self.balance)
        label_sources = acc._label_totals()[2]
        # Weighted sums per (kind, label) — (Σw·n, Σw·f, Σw·ffᵀ), shifted coordinates — summed in place, so a fit
        # over many source cells costs one d² pass per cell and no d² temporaries per cell.
        sums: dict[tuple[str, int | None], tuple[float, np.ndarray, np.ndarray]] = {}
        for key, m in acc.groups.items():
            w = weight[key]
            n_g, s_g, S_g = sums.get(key[:2], (0.0, np.zeros(d), np.zeros((d, d))))
            S_g += m.S if w == 1.0 else w * m.S
            sums[key[:2]] = (n_g + w * m.n, s_g + w * m.s, S_g)
        n_w = sum(g[0] for g in sums.values())
        total_mean = sum(g[1] for g in sums.values()) / n_w
        kinds = sorted({key[0] for key in sums})
        if self.center == "kind":
            centers = {k: sum(g[1] for key, g in sums.items() if key[0] == k) / sum(g[0] for key, g in sums.items() if key[0] == k)
                       for k in kinds}
        else:
            centers = {k: total_mean for k in kinds}

        def about(key: tuple[str, int | None]) -> tuple[float, np.ndarray, np.ndarray]:
            """A group's weighted sums about its kind's center."""
            w_n, w_s, w_S = sums[key]
            c = centers[key[0]]
            return w_n, w_s - w_n * c, w_S - np.outer(w_s, c) - np.outer(c, w_s) + w_n * np.outer(c, c)

        centered = {key: about(key) for key in sums}
        S = sum(c[2] for c in centered.values())
        variances = np.clip(np.diag(S) / n_w, 0.0, None)
        scale = np.maximum(np.sqrt(variances), _MIN_SCALE) if self.standardize else np.ones(d)
        inv = 1.0 / scale
        # The nuisance directions need each benign source's mean about its kind's center (vectors only).
        benign_means: dict[str, np.ndarray] = {}
        if self.method == "lda" and self.nuisance:
            for source in sorted({key[2] for key in acc.groups if key[1] == 0}):
                parts = [(weight[key] * m.n, weight[key] * (m.s - m.n * centers[key[0]]))
                         for key, m in acc.groups.items() if key[1] == 0 and key[2] == source]
                benign_means[source] = np.asarray(sum(p[1] for p in parts) / sum(p[0] for p in parts))

        if self.method == "saft":
            n_centers = len(centers) if self.center == "kind" else 1
            rank_bound = min(n_total - n_centers, d)
            if self.k > rank_bound:
                raise FitError(
                    f"k={self.k} exceeds the rank of the centered calibration matrix (at most {rank_bound} "
                    f"for {n_total} samples in {n_centers} center(s), dimension {d}); use a smaller k or more data"
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
            components, singular_values = self._discriminant(centered, benign_means, n_w, inv)
            signed = True

        self.kinds_ = tuple(kinds)
        self.kind_means_ = np.stack([centers[k] + shift for k in self.kinds_]).astype(np.float32)
        self.mean_ = (total_mean + shift).astype(np.float32)
        self.scale_ = scale.astype(np.float32)
        self.components_ = components.astype(np.float32)
        self.singular_values_ = singular_values.astype(np.float32)
        self.signed_ = signed
        self.n_samples_ = n_total
        self.n_features_in_ = d
        self.statistics_ = FitStatistics(shift.copy(), sums, label_sources)
        return self

    def _discriminant(self, centered: dict[tuple[str, int | None], tuple[float, np.ndarray, np.ndarray]],
                      benign_means: dict[str, np.ndarray], n_w: float, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shrinkage LDA direction (standardized space), with the benign sources' spread projected out."""
        labelled = {key[1] for key in centered}
        if not {0, 1} <= labelled:
            raise FitError("method 'lda' needs labelled calibration data with both label 0 and label 1")
        if None in labelled:
            raise FitError("method 'lda' needs every calibration line labelled (found unlabelled lines)")
        d = inv.shape[0]
        within = np.zeros((d, d))
        means = {}
        for lab in (0, 1):
            parts = [c for key, c in centered.items() if key[1] == lab]
            n_c = sum(p[0] for p in parts)
            s_c = sum(p[1] for p in parts)
            means[lab] = s_c / n_c
            within += sum(p[2] for p in parts) - n_c * np.outer(means[lab], means[lab])
        within = within * np.outer(inv, inv) / n_w
        delta = (means[1] - means[0]) * inv
        project = None
        if self.nuisance:
            rows = [mean * inv for mean in benign_means.values()]
            if len(rows) <= self.nuisance:
                raise FitError(f"nuisance={self.nuisance} needs more than {self.nuisance} benign sources; the "
                               f"calibration set has {len(rows)} (a 'source' field on each line names them)")
            M = np.stack(rows)
            U = np.linalg.svd(M - M.mean(axis=0), full_matrices=False)[2][: self.nuisance].T
            project = np.eye(d) - U @ U.T
            within = project @ within @ project
            delta = project @ delta
        ridge = np.trace(within) / d
        cov = (1 - self.shrinkage) * within + self.shrinkage * ridge * np.eye(d)
        direction = np.linalg.solve(cov, delta)
        if project is not None:
            direction = project @ direction
        norm = float(np.linalg.norm(direction))
        if not np.isfinite(norm) or norm == 0.0:
            raise FitError("the two classes have identical means; no discriminant direction exists")
        return (direction / norm)[None, :], np.array([norm])

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
