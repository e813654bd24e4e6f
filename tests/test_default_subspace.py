"""The committed default subspace loads on the embedded model and separates real harmful from benign items."""

from __future__ import annotations

import numpy as np

from app.artifacts import check_compatible, load_version
from app.config import PROJECT_ROOT
from app.embedding import Embedder
from app.items import parse_item
from app.pipeline import FitOptions, direct_embed, score_encoded


def test_default_subspace_is_compatible_and_detects_harm(embedder: Embedder, dev_rows: list[dict]) -> None:
    subspace, manifest = load_version(PROJECT_ROOT / "models", "default")
    check_compatible(manifest, embedder)  # the committed artifact matches the converted weights
    assert manifest.method == "lda" and manifest.calibration["n_samples"] == 5392
    defaults = FitOptions()  # the committed default is what `saft fit calibration.jsonl` gives without options
    assert manifest.embedding == defaults.embedding and manifest.embedding.max_length == 512
    assert (manifest.k, manifest.center, manifest.standardize, manifest.shrinkage) == \
        (defaults.k, defaults.center, defaults.standardize, defaults.shrinkage)
    items = [parse_item(r) for r in dev_rows]
    encoded, vectors = direct_embed(embedder)(items, manifest.embedding)
    scores = np.array([s.score for s in score_encoded(subspace, manifest, items, encoded, vectors)])
    labels = np.array([r["label"] for r in dev_rows])
    # Held-out dev items (behaviour-disjoint from calibration): every harmful one outranks most benign ones.
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    pairs = np.array([np.mean(scores[labels == 0] < s) for s in scores[labels == 1]])
    assert pairs.mean() > 0.85  # AUROC on this small sample
