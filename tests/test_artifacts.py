"""Subspace artifacts: versioned, atomic, immutable, validated against the loaded model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.config import PROJECT_ROOT
from app.core.embedding import Embedder, EmbeddingConfig
from app.core.subspace import NotFittedError, Subspace
from app.store.artifacts import (
    ArtifactError,
    Manifest,
    active_version,
    check_compatible,
    install_version,
    list_versions,
    load_version,
    render_version,
    save_version,
    set_active,
    version_files,
)
from tests.support import demo_manifest, random_subspace


def test_roundtrip_scores_identically(tmp_path: Path) -> None:
    sub, X = random_subspace()
    saved = save_version(tmp_path, sub, demo_manifest())
    loaded, manifest = load_version(tmp_path, "demo")
    assert manifest.version == saved.version == "v1"
    assert manifest.threshold == 1.5 and manifest.embedding == EmbeddingConfig(layers=(3,))
    assert np.array_equal(loaded.score_samples(X), sub.score_samples(X))
    on_disk = json.loads((tmp_path / "demo" / "v1" / "manifest.json").read_text())
    for key in ("model", "embedding", "subspace", "threshold", "calibration", "quality", "created_at", "version"):
        assert key in on_disk
    assert (tmp_path / "demo" / "v1" / "subspace.safetensors").is_file()


def test_versions_increment_and_rollback(tmp_path: Path) -> None:
    save_version(tmp_path, random_subspace(0)[0], demo_manifest())
    save_version(tmp_path, random_subspace(1)[0], demo_manifest())
    third = save_version(tmp_path, random_subspace(2)[0], demo_manifest(), activate=False)
    assert list_versions(tmp_path, "demo") == ["v1", "v2", "v3"]
    assert third.version == "v3" and active_version(tmp_path, "demo") == "v2"
    set_active(tmp_path, "demo", "v1")
    assert load_version(tmp_path, "demo")[1].version == "v1"
    assert not [p for p in (tmp_path / "demo").iterdir() if p.name.startswith(".")], "no temp dirs or files left"
    with pytest.raises(ArtifactError, match="no version 'v9'"):
        set_active(tmp_path, "demo", "v9")


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "UPPER", ".hidden"])
def test_names_outside_models_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ArtifactError, match="must match"):
        load_version(tmp_path, name)


@pytest.mark.parametrize("version", ["../v1", "v1/..", "1", "latest"])
def test_bad_versions_are_refused(tmp_path: Path, version: str) -> None:
    with pytest.raises(ArtifactError, match="must match"):
        load_version(tmp_path, "demo", version)


def test_mismatched_model_is_refused(tmp_path: Path, embedder: Embedder) -> None:
    manifest, (subspace, _) = demo_manifest(), random_subspace()
    with pytest.raises(ArtifactError, match="refit it for this model"):
        check_compatible(manifest, subspace, embedder)
    manifest.weights_digest = embedder.weights_digest
    check_compatible(manifest, subspace, embedder)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    sub = Subspace(k=1)  # not fitted: writing its tensors fails midway
    with pytest.raises(NotFittedError, match="not fitted"):
        save_version(tmp_path, sub, demo_manifest())
    assert list_versions(tmp_path, "demo") == []
    assert not list((tmp_path / "demo").iterdir())


def test_malformed_manifest_is_a_clear_error(tmp_path: Path) -> None:
    save_version(tmp_path, random_subspace()[0], demo_manifest())
    path = tmp_path / "demo" / "v1" / "manifest.json"
    data = json.loads(path.read_text())
    del data["threshold"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="malformed.*threshold"):
        load_version(tmp_path, "demo")


def test_rendered_version_installs_atomically_once_and_is_immutable(tmp_path: Path) -> None:
    """What a fleet publishes (bytes numbered under its lock) installs on any replica's disk as the same version."""
    sub, X = random_subspace()
    files = render_version(sub, demo_manifest(), "v7")
    assert install_version(tmp_path, "demo", "v7", files) is True
    assert install_version(tmp_path, "demo", "v7", files) is False  # idempotent: a replica may hear it twice
    assert version_files(tmp_path, "demo", "v7") == files
    loaded, manifest = load_version(tmp_path, "demo", "v7")
    assert manifest.version == "v7" and np.array_equal(loaded.score_samples(X), sub.score_samples(X))
    other = render_version(random_subspace(seed=1)[0], demo_manifest(), "v7")
    with pytest.raises(ArtifactError, match="immutable"):
        install_version(tmp_path, "demo", "v7", other)
    assert version_files(tmp_path, "demo", "v7") == files  # untouched
    with pytest.raises(ArtifactError, match="expected demo/v8"):
        install_version(tmp_path, "demo", "v8", files)  # the manifest says v7
    with pytest.raises(ArtifactError, match="expected files"):
        install_version(tmp_path, "demo", "v9", {"manifest.json": files["manifest.json"]})
    assert list_versions(tmp_path, "demo") == ["v7"]
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["v7"]  # no temp dirs left behind
    save_version(tmp_path, sub, demo_manifest())
    assert list_versions(tmp_path, "demo") == ["v7", "v8"]  # local numbering continues above installed versions


def test_per_kind_thresholds_and_fit_parameters_round_trip_and_old_manifests_still_load(tmp_path: Path) -> None:
    sub, _X = random_subspace()
    manifest = demo_manifest()
    manifest.thresholds, manifest.balance, manifest.nuisance = {"text": 0.5, "pair": 2.5}, "source", 3
    save_version(tmp_path, sub, manifest)
    loaded, back = load_version(tmp_path, "demo")
    assert back.thresholds == {"text": 0.5, "pair": 2.5} and (back.balance, back.nuisance) == ("source", 3)
    assert (loaded.balance, loaded.nuisance) == ("source", 3)
    assert back.threshold_for("pair") == 2.5 and back.threshold_for("text") == 0.5
    on_disk = json.loads((tmp_path / "demo" / "v1" / "manifest.json").read_text())
    assert on_disk["threshold"]["by_kind"] == {"text": 0.5, "pair": 2.5} and on_disk["subspace"]["balance"] == "source"
    # A manifest written before per-kind τ (the committed default/v1 and v2): one τ for every kind, items weighed alike.
    old = Manifest.from_json(json.loads((PROJECT_ROOT / "models" / "default" / "v2" / "manifest.json").read_text()))
    assert old.thresholds == {} and old.threshold_for("pair") == old.threshold_for("text") == old.threshold
    assert (old.balance, old.nuisance) == ("item", 0)


def test_store_faults_are_server_faults_and_say_nothing_changed(tmp_path: Path) -> None:
    """A store that cannot be written (here: its root is a file) or read is a 5xx, not the caller's 422."""
    from app.api.errors import status_of
    from app.core.embedding import EmbeddingError, ModelFault
    from app.core.manifest import ArtifactError
    from app.store.artifacts import CorruptVersion, StoreWriteError

    root = tmp_path / "models"
    root.write_text("not a directory")
    with pytest.raises(StoreWriteError, match="nothing was published"):
        save_version(root, random_subspace()[0], demo_manifest())
    good = tmp_path / "store"
    saved = save_version(good, random_subspace()[0], demo_manifest())
    (good / "demo" / saved.version / "subspace.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CorruptVersion, match="cannot be read"):
        load_version(good, "demo", saved.version)
    assert status_of(StoreWriteError("x")) == (507, "storage_error")
    assert status_of(CorruptVersion("x")) == (500, "storage_error")
    assert status_of(ModelFault("x")) == (424, "model_error")
    assert status_of(ArtifactError("x")) == (422, "invalid_input") and status_of(EmbeddingError("x")) == (422, "invalid_input")
