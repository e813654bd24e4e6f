"""The SAFT fit on real embeddings: streaming moments equal a plain SVD; errors are clear."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.embedding import Embedder, EmbeddingConfig
from app.core.items import parse_item
from app.core.subspace import FitError, MomentAccumulator, NotFittedError, Subspace


@pytest.fixture(scope="module")
def real(embedder: Embedder, calibration_rows: list[dict]) -> tuple[np.ndarray, list[str], list[int]]:
    items = [parse_item(r) for r in calibration_rows]
    config = EmbeddingConfig(layers=(16,), pooling="mean", max_length=128)
    X = embedder.embed(embedder.encode_items(items, config), config)
    return X, [i.kind for i in items], [r["label"] for r in calibration_rows]


def _paper_score(X: np.ndarray, F_ref: np.ndarray, mean: np.ndarray, scale: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """s(x) = (1/k) Σ σ_j ⟨(f−μ)/scale, v_j⟩² straight from numpy's SVD of the centered matrix."""
    _, sigma, vt = np.linalg.svd((F_ref - mean) / scale, full_matrices=False)
    proj = ((X - mean) / scale) @ vt[:k].T
    return (sigma[:k] * proj**2).sum(axis=1) / k, vt[:k]


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("k", [1, 4])
def test_streaming_fit_equals_plain_svd(real, standardize: bool, k: int) -> None:
    X, kinds, _ = real
    X64 = X.astype(np.float64)
    acc = MomentAccumulator(X.shape[1])
    for start in range(0, len(X), 7):  # streamed in uneven chunks
        acc.update(X[start : start + 7], kinds[start : start + 7], [None] * len(X[start : start + 7]))
    sub = Subspace(k=k, standardize=standardize).fit_moments(acc)
    mean = X64.mean(axis=0)
    scale = X64.std(axis=0) if standardize else np.ones(X.shape[1])
    expected, vt = _paper_score(X64, X64, mean, scale, k)
    got = sub.score_samples(X)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5
    # Same subspace: the projector onto the top-k directions agrees.
    P_mine = sub.components_.T.astype(np.float64) @ sub.components_.astype(np.float64)
    assert np.abs(P_mine - vt.T @ vt).max() < 1e-4
    _, sigma, _ = np.linalg.svd((X64 - mean) / scale, full_matrices=False)
    assert np.allclose(sub.singular_values_, sigma[:k], rtol=1e-5)


def test_kind_centering_removes_format_offset(real) -> None:
    X, kinds, labels = real
    sub = Subspace(k=1, center="kind").fit(X, kinds, labels)
    for kind in ("text", "pair"):
        rows = X[np.asarray(kinds) == kind].astype(np.float64)
        assert np.allclose(sub.kind_means_[sub.kinds_.index(kind)], rows.mean(axis=0), rtol=1e-4, atol=1e-3)
    # An item is centered on its own kind's mean.
    centers = sub.centers_for(["pair", "text", "unknown"], 3)
    assert np.array_equal(centers[0], sub.kind_means_[sub.kinds_.index("pair")])
    assert np.array_equal(centers[2], sub.mean_)


def test_lda_direction_separates_labels_and_is_signed(real) -> None:
    X, kinds, labels = real
    sub = Subspace(method="lda", shrinkage=0.5).fit(X, kinds, labels)
    assert sub.signed_ and sub.components_.shape == (1, X.shape[1])
    s = sub.score_samples(X)
    y = np.asarray(labels)
    assert s[y == 1].mean() > s[y == 0].mean()
    assert np.isclose(np.linalg.norm(sub.components_[0]), 1.0, atol=1e-5)


def test_signs_are_deterministic(real) -> None:
    X, kinds, _ = real
    a = Subspace(k=3).fit(X, kinds).components_
    b = Subspace(k=3).fit(X[::-1].copy(), kinds[::-1]).components_
    assert np.allclose(a, b, atol=1e-4)
    assert (a[np.arange(3), np.abs(a).argmax(axis=1)] > 0).all()


def test_fit_errors_are_clear(real) -> None:
    X, kinds, _labels = real
    with pytest.raises(FitError, match="at least 2"):
        Subspace().fit(X[:1], kinds[:1])
    with pytest.raises(FitError, match="k=60 exceeds the rank"):
        Subspace(k=60).fit(X[:20], kinds[:20])
    with pytest.raises(FitError, match="needs labelled"):
        Subspace(method="lda").fit(X, kinds)
    bad = X.copy()
    bad[3, 5] = np.nan
    with pytest.raises(FitError, match="NaN/inf in rows \\[3\\]"):
        Subspace().fit(bad, kinds)
    with pytest.raises(NotFittedError):
        Subspace().score_samples(X)
    with pytest.raises(ValueError, match="shape"):
        Subspace().fit(X, kinds).score_samples(X[:, :10])
