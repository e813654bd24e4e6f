"""A subspace records the numeric path it was fitted on, with probe items; loading it on another path re-scores them and
refuses the version when the scores move beyond the tolerance (issue 17: a lever must not silently move scores)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from app.config import PROJECT_ROOT
from app.core.embedding import Embedder
from app.core.manifest import Manifest
from app.core.numeric_path import PROBES_PER_CELL, REFERENCE_PATH, NumericPath, Probe, check_numeric_path
from app.core.pipeline import fit_lines, parse_line
from app.store.artifacts import ArtifactError, check_compatible, load_version, save_version
from app.store.registry import SubspaceRegistry
from tests.support import FAST_OPTIONS

GPU_BF16 = NumericPath("cuda", "bfloat16", "sdpa")


@pytest.fixture(scope="module")
def fitted(embedder: Embedder, calibration_rows: list[dict]):
    lines = [parse_line(i + 1, json.dumps(r)) for i, r in enumerate(calibration_rows)]
    return fit_lines(embedder, lines, FAST_OPTIONS, name="pathtest", calibration_digest="test")


def test_a_fit_records_its_path_and_probes_of_every_cell(fitted, embedder: Embedder, calibration_rows: list[dict]) -> None:
    manifest = fitted.manifest
    assert manifest.numeric_path == embedder.numeric_path == NumericPath("cpu", "float32", "sdpa")
    cells = {(k, int(y)) for k, y in zip(fitted.meta["item_kind"], fitted.labels, strict=True)}
    assert len(cells) == 4 and len(manifest.probes) == PROBES_PER_CELL * len(cells)  # two of each (kind, label) cell
    assert {p.item.kind for p in manifest.probes} == {"text", "pair"}
    # each probe's score is the fit's own score of that item, at its position in the calibration stream
    items = [parse_line(i + 1, json.dumps(r)).item for i, r in enumerate(calibration_rows)]
    assert len(items) == len(fitted.scores)  # every row valid: the stream is the rows
    for probe in manifest.probes:
        assert probe.score == fitted.scores[items.index(probe.item)]
    back = Manifest.from_json(json.loads(json.dumps(manifest.to_json())))
    assert back.numeric_path == manifest.numeric_path and back.probes == manifest.probes


def test_the_same_path_runs_nothing(fitted, embedder: Embedder) -> None:
    assert check_numeric_path(embedder.numeric_path, [], fitted.subspace, embedder, fitted.manifest.embedding, what="x") is None


def test_another_path_rescores_the_probes_and_accepts_scores_within_tolerance(fitted, embedder: Embedder) -> None:
    # Recorded as fitted on a GPU in bf16: this CPU fp32 server re-scores the probes, which the fit scored on this very
    # path, so they agree to float noise and the version is accepted.
    delta = check_numeric_path(GPU_BF16, fitted.manifest.probes, fitted.subspace, embedder, fitted.manifest.embedding,
                               what="pathtest/v1")
    assert delta is not None and delta < 1e-3


def test_a_path_that_moves_the_scores_is_refused_at_load(fitted, embedder: Embedder, tmp_path: Path) -> None:
    moved = [dataclasses.replace(p, score=p.score + (0.2 if i == 1 else 0.0)) for i, p in enumerate(fitted.manifest.probes)]
    manifest = dataclasses.replace(fitted.manifest, numeric_path=GPU_BF16, probes=moved)
    saved = save_version(tmp_path, fitted.subspace, manifest, activate=True)
    subspace, loaded = load_version(tmp_path, "pathtest", saved.version)
    with pytest.raises(ArtifactError, match=r"cuda/bfloat16/sdpa attention; on this server's cpu/float32/sdpa attention its "
                                            r"probe scores move by up to 0\.2"):
        check_compatible(loaded, subspace, embedder)
    registry = SubspaceRegistry(tmp_path, "pathtest", embedder)  # the service's load path refuses it too
    with pytest.raises(ArtifactError, match="probe scores move"):
        registry.load_active()
    assert registry.current is None


def test_another_path_without_probes_is_refused(fitted, embedder: Embedder) -> None:
    manifest = dataclasses.replace(fitted.manifest, numeric_path=GPU_BF16, probes=[])
    with pytest.raises(ArtifactError, match="has no probe items"):
        check_compatible(manifest, fitted.subspace, embedder)


def test_old_manifests_read_as_the_reference_path_and_the_default_carries_probes(embedder: Embedder) -> None:
    old = {k: v for k, v in _minimal_json().items() if k not in ("numeric_path", "probes")}
    assert Manifest.from_json(old).numeric_path == REFERENCE_PATH and Manifest.from_json(old).probes == []
    subspace, manifest = load_version(PROJECT_ROOT / "models", "default")
    assert manifest.numeric_path == REFERENCE_PATH == embedder.numeric_path
    assert {p.item.kind for p in manifest.probes} == {"text", "pair"} and len(manifest.probes) >= 8
    # the committed probes are what this build scores them (so a GPU or bf16 server can measure its own difference)
    delta = check_numeric_path(GPU_BF16, manifest.probes, subspace, embedder, manifest.embedding, what="default")
    assert delta is not None and delta < 1e-3


def test_a_probe_that_is_not_an_item_is_a_clear_error() -> None:
    with pytest.raises(ArtifactError, match="manifest field probes: messages"):
        Manifest.from_json({**_minimal_json(), "probes": [{"messages": "not a list", "score": 1.0}]})
    with pytest.raises(ValueError):
        Probe.from_json({"messages": [{"role": "user", "content": ""}], "score": 0.0})


def _minimal_json() -> dict:
    return load_version(PROJECT_ROOT / "models", "default")[1].to_json()


def test_a_compiled_server_checks_the_default_by_its_probes_and_accepts_it() -> None:
    # SAFT_COMPILE_BLOCKS=true: another path (compiled blocks), so loading the default re-scores its probes there.
    from app.config import Settings

    compiled = Embedder.from_settings(Settings(compile_blocks=True))
    assert compiled.numeric_path == NumericPath("cpu", "float32", "sdpa", compiled=True) != REFERENCE_PATH
    subspace, manifest = load_version(PROJECT_ROOT / "models", "default")
    delta = check_numeric_path(manifest.numeric_path, manifest.probes, subspace, compiled, manifest.embedding, what="default")
    assert delta is not None and delta <= 1e-3  # inductor's fused kernels: float noise, far inside the tolerance
    check_compatible(manifest, subspace, compiled)  # the load path accepts it
