"""The committed default subspace loads on the embedded model, is what `saft fit` makes of the whole pool with
the default options, and separates real harmful from benign items of every kind."""

from __future__ import annotations

import numpy as np

from app.config import PROJECT_ROOT
from app.core.embedding import Embedder
from app.core.items import parse_item
from app.core.pipeline import FitOptions, direct_embed, score_encoded
from app.store.artifacts import check_compatible, load_version
from tests.support import DATA_DIR


def test_default_subspace_is_compatible_and_detects_harm(embedder: Embedder, dev_rows: list[dict]) -> None:
    subspace, manifest = load_version(PROJECT_ROOT / "models", "default")
    check_compatible(manifest, subspace, embedder)  # the committed artifact matches the converted weights
    # Fitted on the whole labelled pool (calibration + dev_eval + extra_sources), every valid line of it.
    files = manifest.calibration["path"].split(",")
    assert files == ["calibration.jsonl", "dev_eval.jsonl", "extra_sources.jsonl"]
    n_lines = sum(sum(1 for _ in (DATA_DIR / f).open()) for f in files)
    assert manifest.calibration["n_samples"] + manifest.calibration["rejected"]["count"] == n_lines
    assert manifest.calibration["rejected"]["count"] == 4  # the four pairs with an empty response
    defaults = FitOptions()  # the committed default is what `saft fit <pool>` gives without options
    assert manifest.method == "lda" and manifest.embedding == defaults.embedding
    assert (manifest.k, manifest.center, manifest.standardize, manifest.shrinkage, manifest.balance, manifest.nuisance) == \
        (defaults.k, defaults.center, defaults.standardize, defaults.shrinkage, defaults.balance, defaults.nuisance)
    assert set(manifest.thresholds) == {"text", "pair"} and manifest.threshold_policy.as_dict() == {"kind": "fpr", "value": 0.05}
    assert manifest.probability is not None  # calibrated P(harmful) per kind
    items = [parse_item(r) for r in dev_rows]
    encoded, vectors = direct_embed(embedder)(items, manifest.embedding)
    scored = score_encoded(subspace, manifest, items, encoded, vectors)
    scores = np.array([s.score for s in scored])
    labels = np.array([r["label"] for r in dev_rows])
    kinds = np.array([r["kind"] for r in dev_rows])
    for kind in ("prompt", "pair"):  # in-sample for the default (dev is part of its pool): a floor, not a measure
        m = kinds == kind
        pairs = np.array([np.mean(scores[m & (labels == 0)] < s) for s in scores[m & (labels == 1)]])
        assert pairs.mean() > 0.9, kind
    assert all(s.threshold == manifest.thresholds[item.kind] for s, item in zip(scored, items, strict=True))
