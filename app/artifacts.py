"""Subspace artifacts on disk: ``models/<name>/<version>/{subspace.safetensors, manifest.json}``.

A version is written once, atomically (temp dir + rename), and never changed; ``models/<name>/ACTIVE``
names the active version (replaced atomically). Names and versions are validated so no path
outside ``models/`` is ever touched. Loading checks the manifest against the loaded model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save, save_file

from app.calibration import CalibrationError
from app.calibration import check as check_calibration
from app.embedding import Embedder, EmbeddingConfig
from app.quality import ThresholdPolicy
from app.subspace import FitStatistics, Subspace

FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^v[0-9]{1,9}$")
TENSORS = "subspace.safetensors"
MANIFEST = "manifest.json"
ACTIVE = "ACTIVE"


class ArtifactError(ValueError):
    """A subspace artifact is missing, malformed, or does not match the loaded model."""


class StoreWriteError(ArtifactError):
    """Writing to the store failed (disk full, quota, read-only, permissions): a server fault, nothing changed."""


class CorruptVersion(ArtifactError):
    """A stored version cannot be read (unreadable file, not JSON, bad tensors): the store's fault, not the caller's."""


@dataclass
class Manifest:
    """Everything needed to reproduce and trust a subspace version."""

    name: str
    model_id: str
    weights_digest: str
    embedding: EmbeddingConfig
    method: str
    k: int
    center: str
    standardize: bool
    shrinkage: float
    signed: bool
    kinds: list[str]
    threshold: float
    threshold_policy: ThresholdPolicy
    calibration: dict[str, Any]
    quality: dict[str, Any] = field(default_factory=dict)
    #: τ per item kind ("text", "pair"), chosen by the same policy on each kind's calibration items; a kind
    #: missing here (every version before per-kind thresholds) uses ``threshold``.
    thresholds: dict[str, float] = field(default_factory=dict)
    balance: str = "item"  # versions before source balancing weighed every item alike
    nuisance: int = 0
    version: str = ""
    created_at: str = ""
    format_version: int = FORMAT_VERSION
    #: score → P(harmful) per item kind (``app.calibration``), fitted on labelled calibration items; None for
    #: unlabelled fits and every version before calibrated probabilities (their manifests have no "probability").
    probability: dict[str, Any] | None = None
    #: How a refit on an upload came about (``app.pipeline.fit_lines`` with a prior): the strategy, the version it
    #: started from, the upload's counts, and both versions compared on it; the service adds its activation decision.
    refit: dict[str, Any] | None = None

    def threshold_for(self, kind: str) -> float:
        """The τ that decides an item of ``kind``: its own where the fit chose one, else the single τ."""
        return self.thresholds.get(kind, self.threshold)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "model": {"id": self.model_id, "weights_sha256": self.weights_digest},
            "embedding": self.embedding.as_dict(),
            "subspace": {
                "method": self.method,
                "k": self.k,
                "center": self.center,
                "standardize": self.standardize,
                "shrinkage": self.shrinkage,
                "signed": self.signed,
                "kinds": self.kinds,
                "balance": self.balance,
                "nuisance": self.nuisance,
            },
            "threshold": {"value": self.threshold, "policy": self.threshold_policy.as_dict(),
                          **({"by_kind": self.thresholds} if self.thresholds else {})},
            "calibration": self.calibration,
            "quality": self.quality,
            **({"probability": self.probability} if self.probability is not None else {}),
            **({"refit": self.refit} if self.refit is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        try:
            sub = data["subspace"]
            return cls(
                name=data["name"],
                version=data["version"],
                created_at=data["created_at"],
                format_version=data["format_version"],
                model_id=data["model"]["id"],
                weights_digest=data["model"]["weights_sha256"],
                embedding=EmbeddingConfig.from_dict(data["embedding"]),
                method=sub["method"],
                k=sub["k"],
                center=sub["center"],
                standardize=sub["standardize"],
                shrinkage=sub["shrinkage"],
                signed=sub["signed"],
                kinds=list(sub["kinds"]),
                balance=sub.get("balance", "item"),
                nuisance=int(sub.get("nuisance", 0)),
                threshold=float(data["threshold"]["value"]),
                threshold_policy=ThresholdPolicy(**data["threshold"]["policy"]),
                thresholds={str(k): float(v) for k, v in data["threshold"].get("by_kind", {}).items()},
                calibration=data["calibration"],
                quality=data.get("quality", {}),
                probability=data.get("probability"),
                refit=data.get("refit"),
            )
        except (KeyError, TypeError) as err:
            raise ArtifactError(f"manifest is malformed: missing or wrong field {err}") from None


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):  # fullmatch: '$' alone would let 'name\n' through
        raise ArtifactError(f"subspace name {name!r} must match {NAME_RE.pattern}")
    return name


def check_version(version: str) -> str:
    if not VERSION_RE.fullmatch(version):
        raise ArtifactError(f"version {version!r} must match {VERSION_RE.pattern}")
    return version


def list_versions(root: Path, name: str) -> list[str]:
    """Published versions of ``name``, oldest first."""
    base = root / check_name(name)
    if not base.is_dir():
        return []
    found = [p.name for p in base.iterdir() if VERSION_RE.fullmatch(p.name) and not p.is_symlink() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda v: int(v[1:]))


def scratch_prefix(purpose: str) -> str:
    """Prefix of a temp file or dir beside the artifacts. Host and pid name its writer, so a start can
    remove what a killed writer left (``remove_stale_scratch``) and never what a live one is writing."""
    return f".{purpose}-{socket.gethostname()}-{os.getpid()}-"


SCRATCH_RE = re.compile(r"\.[a-z]+-(?P<host>.+)-(?P<pid>[0-9]+)-[a-z0-9_]+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_scratch(root: Path, name: str) -> list[str]:
    """Remove what writers on this host that are gone (kill -9 mid-write) left under ``models/<name>``.

    Call it at start, before this process writes: a leftover with this process's own pid is then a
    dead predecessor's (pids are reused, in containers often).
    """
    return remove_stale_scratch_in(root / check_name(name))


def remove_stale_scratch_in(base: Path, purpose: str | None = None) -> list[str]:
    """``remove_stale_scratch`` for any directory (e.g. refit uploads in the temp dir), optionally one purpose."""
    if not base.is_dir():
        return []
    removed = []
    for path in base.iterdir():
        match = SCRATCH_RE.fullmatch(path.name)
        if match is None or match["host"] != socket.gethostname():
            continue
        if purpose is not None and not path.name.startswith(f".{purpose}-"):
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix("replacing"), dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def subspace_tensors(subspace: Subspace) -> dict[str, np.ndarray]:
    """The fitted arrays, and the calibration statistics a later refit can start from (``FitStatistics``)."""
    stats = getattr(subspace, "statistics_", None)
    return {
        "components": subspace.components_,
        "singular_values": subspace.singular_values_,
        "mean": subspace.mean_,
        "kind_means": subspace.kind_means_,
        "scale": subspace.scale_,
        **(stats.to_tensors() if stats is not None else {}),
    }


def save_version(root: Path, subspace: Subspace, manifest: Manifest, *, activate: bool = True) -> Manifest:
    """Publish a new immutable version (next free ``vN``) atomically; optionally make it active."""
    base = root / check_name(manifest.name)
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=scratch_prefix("writing"), dir=base))
    except OSError as err:
        raise StoreWriteError(f"subspace {manifest.name}: cannot write under {base} ({err}); nothing was published") from err
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the version from other users of models/
        save_file(subspace_tensors(subspace), str(tmp / TENSORS))
        manifest.created_at = datetime.now(UTC).isoformat(timespec="seconds")
        while True:
            existing = list_versions(root, manifest.name)
            manifest.version = f"v{int(existing[-1][1:]) + 1 if existing else 1}"
            (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False))
            for f in (TENSORS, MANIFEST):
                (tmp / f).chmod(0o644)
                with (tmp / f).open("rb") as fh:
                    os.fsync(fh.fileno())
            try:
                os.rename(tmp, base / manifest.version)  # fails if a concurrent writer took the number
                break
            except OSError:
                if not (base / manifest.version).exists():
                    raise
    except (OSError, SafetensorError) as err:  # disk full, quota, read-only: say what, and that nothing changed
        raise StoreWriteError(f"subspace {manifest.name}: writing a new version under {base} failed ({err}); "
                            "nothing was published") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if activate:
        set_active(root, manifest.name, manifest.version)
    return manifest


def render_version(subspace: Subspace, manifest: Manifest, version: str) -> dict[str, bytes]:
    """A version's files as bytes, numbered by the caller: a fleet publishes them to Redis first
    (the number allocated under its refit lock), then every replica installs them with ``install_version``."""
    manifest.version = check_version(version)
    manifest.created_at = datetime.now(UTC).isoformat(timespec="seconds")
    return {TENSORS: save(subspace_tensors(subspace)), MANIFEST: json.dumps(manifest.to_json(), indent=2).encode()}


def version_files(root: Path, name: str, version: str) -> dict[str, bytes]:
    """The bytes of a published version (what a fleet publishes and other replicas install)."""
    path = root / check_name(name) / check_version(version)
    try:
        return {f: (path / f).read_bytes() for f in (MANIFEST, TENSORS)}
    except FileNotFoundError:
        raise ArtifactError(f"subspace {name}/{version} is missing under {root}") from None


def install_version(root: Path, name: str, version: str, files: dict[str, bytes]) -> bool:
    """Write a version published elsewhere, atomically; True if written, False if already present.

    Versions are immutable: an existing version with other bytes is an error, never overwritten.
    """
    if set(files) != {MANIFEST, TENSORS}:
        raise ArtifactError(f"subspace {name}/{version}: expected files {MANIFEST} and {TENSORS}, got {sorted(files)}")
    manifest = Manifest.from_json(json.loads(files[MANIFEST]))
    if (manifest.name, manifest.version) != (name, check_version(version)):
        raise ArtifactError(f"manifest names {manifest.name}/{manifest.version}, expected {name}/{version}")
    base = root / check_name(name)
    if (base / version).exists():
        if version_files(root, name, version) != files:
            raise ArtifactError(f"subspace {name}/{version} exists here with different content; versions are immutable")
        return False
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=scratch_prefix("writing"), dir=base))
    try:
        try:
            for f, data in files.items():
                with (tmp / f).open("wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as err:
            raise StoreWriteError(f"subspace {name}/{version}: installing under {base} failed ({err}); nothing was published") from None
        try:
            os.rename(tmp, base / version)
        except OSError:
            if version_files(root, name, version) != files:
                raise ArtifactError(f"subspace {name}/{version} was written concurrently with different content") from None
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def set_active(root: Path, name: str, version: str) -> None:
    if check_version(version) not in list_versions(root, name):
        raise ArtifactError(f"subspace {name!r} has no version {version!r}")
    try:
        _atomic_write_text(root / name / ACTIVE, version + "\n")
    except OSError as err:
        raise StoreWriteError(f"subspace {name}: {version} could not be made active ({err}); the active version is unchanged") from err


def active_version(root: Path, name: str) -> str | None:
    pointer = root / check_name(name) / ACTIVE
    if not pointer.is_file():
        versions = list_versions(root, name)
        return versions[-1] if versions else None
    return check_version(pointer.read_text().strip())


def load_version(root: Path, name: str, version: str | None = None) -> tuple[Subspace, Manifest]:
    """Load a version (default: the active one) into a ready ``Subspace``."""
    version = check_version(version) if version else active_version(root, name)
    if version is None:
        raise ArtifactError(f"no subspace named {name!r} under {root}")
    path = root / name / version
    if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
        raise ArtifactError(f"subspace {name}/{version} is missing under {root}")
    if any(p.is_symlink() for p in (path, path / MANIFEST, path / TENSORS)):  # never read outside models/
        raise ArtifactError(f"subspace {name}/{version} is a symlink; versions are plain files under {root}")
    try:
        manifest = Manifest.from_json(json.loads((path / MANIFEST).read_text()))
    except ValueError as err:  # not JSON, not UTF-8
        raise CorruptVersion(f"subspace {name}/{version}: {MANIFEST} is not valid JSON ({err})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{name}/{version} has format {manifest.format_version}; this build reads {FORMAT_VERSION}")
    if manifest.probability is not None:
        try:  # refused here, at load, rather than failing every request it scores
            check_calibration(manifest.probability)
        except CalibrationError as err:
            raise ArtifactError(f"subspace {name}/{version}: {err}") from None
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError) as err:  # corrupt or foreign (a pickle is never loaded)
        raise CorruptVersion(f"subspace {name}/{version}: {TENSORS} cannot be read ({err})") from None
    missing = {"components", "singular_values", "mean", "kind_means", "scale"} - set(tensors)
    if missing:
        raise ArtifactError(f"subspace {name}/{version}: {TENSORS} lacks {sorted(missing)}")
    subspace = Subspace(
        k=manifest.k,
        method=manifest.method,  # type: ignore[arg-type]  # manifest fields are str until FitParams (step 3)
        center=manifest.center,  # type: ignore[arg-type]  # as above
        standardize=manifest.standardize,
        shrinkage=manifest.shrinkage,
        balance=manifest.balance,  # type: ignore[arg-type]  # as above
        nuisance=manifest.nuisance,
    )
    subspace.components_ = tensors["components"]
    subspace.singular_values_ = tensors["singular_values"]
    subspace.mean_ = tensors["mean"]
    subspace.kind_means_ = tensors["kind_means"]
    subspace.scale_ = tensors["scale"]
    subspace.kinds_ = tuple(manifest.kinds)
    subspace.signed_ = manifest.signed
    subspace.n_features_in_ = int(tensors["mean"].shape[0])
    subspace.n_samples_ = int(manifest.calibration.get("n_samples", 0))
    try:
        subspace.statistics_ = FitStatistics.from_tensors(tensors)
    except (KeyError, ValueError) as err:
        raise ArtifactError(f"subspace {name}/{version}: its calibration statistics are malformed ({err})") from None
    return subspace, manifest


def check_compatible(manifest: Manifest, embedder: Embedder) -> None:
    """Refuse a subspace fitted on another model: its scores would be meaningless."""
    if manifest.weights_digest != embedder.weights_digest:
        raise ArtifactError(
            f"subspace {manifest.name}/{manifest.version} was fitted on {manifest.model_id} "
            f"(weights sha256 {manifest.weights_digest[:12]}…) but the loaded model is {embedder.model_id} "
            f"(sha256 {embedder.weights_digest[:12]}…); refit it for this model"
        )
    embedder.normalize_layers(manifest.embedding.layers)
