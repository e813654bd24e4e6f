"""Shared fixtures: the real embedded model and a small, stratified sample of the real shared data."""

from __future__ import annotations

import json
import random

import pytest

from app.core.embedding import EMBEDDED_DECODER, EMBEDDED_ENCODER, Embedder
from tests.support import DATA_DIR


def _sample(name: str, per_group: int, seed: int = 0) -> list[dict]:
    """``per_group`` lines of each (kind, label) from a shared file, deterministic."""
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the tests need ../shared/data beside the checkout")
    rows = [json.loads(line) for line in path.open()]
    random.Random(seed).shuffle(rows)
    out, seen = [], {}
    for row in rows:
        key = (row["kind"], row["label"])
        if seen.get(key, 0) < per_group:
            seen[key] = seen.get(key, 0) + 1
            out.append(row)
    return out


@pytest.fixture(scope="session")
def calibration_rows() -> list[dict]:
    return _sample("calibration", 12)


@pytest.fixture(scope="session")
def dev_rows() -> list[dict]:
    return _sample("dev_eval", 8, seed=1)


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder.load(EMBEDDED_DECODER)


@pytest.fixture(scope="session")
def encoder() -> Embedder:
    return Embedder.load(EMBEDDED_ENCODER)
