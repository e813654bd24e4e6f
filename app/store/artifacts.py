"""Subspace artifacts on disk: ``models/<name>/<version>/{subspace.safetensors, manifest.json}``.

A version is written once, atomically (temp dir + rename), and never changed; ``models/<name>/ACTIVE``
names the active version (replaced atomically). Names and versions are validated so no path
outside ``models/`` is ever touched. Loading checks the manifest against the loaded model and the numeric path it runs.

Owns: the on-disk layout, name and version validation, atomic saves and installs, the ACTIVE pointer, loading and
``check_compatible``, scratch files named by host and pid and their cleanup. Must not: know HTTP, Redis or the
serving layer, change a version once written, or touch anything outside ``models/`` but its own scratch files
(refit uploads in the temp dir).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import load_file, save, save_file

from app.core.calibration import CalibrationError
from app.core.calibration import check as check_calibration
from app.core.embedding import Embedder
from app.core.manifest import FORMAT_VERSION, ArtifactError, Manifest
from app.core.numeric_path import NumericPathMismatch, check_numeric_path
from app.core.subspace import FitError, Subspace

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^v[0-9]{1,9}$")
TENSORS = "subspace.safetensors"
MANIFEST = "manifest.json"
ACTIVE = "ACTIVE"


class StoreWriteError(ArtifactError):
    """Writing to the store failed (disk full, quota, read-only, permissions): a server fault, nothing changed."""


class CorruptVersion(ArtifactError):
    """A stored version cannot be read (unreadable file, not JSON, bad tensors): the store's fault, not the caller's."""


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
        save_file(subspace.to_tensors(), str(tmp / TENSORS))
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
    return {TENSORS: save(subspace.to_tensors()), MANIFEST: json.dumps(manifest.to_json(), indent=2).encode()}


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
    try:
        subspace = Subspace.from_tensors(manifest.subspace_params(), tensors, kinds=manifest.kinds, signed=manifest.signed,
                                         n_samples=int(manifest.calibration.get("n_samples", 0)))
    except FitError as err:
        raise ArtifactError(f"subspace {name}/{version}: {TENSORS}: {err}") from None
    return subspace, manifest


def check_compatible(manifest: Manifest, subspace: Subspace, embedder: Embedder) -> None:
    """Refuse a subspace fitted on another model (its scores would be meaningless), with layers the model lacks, or on
    another numeric path that moves its probe scores beyond the tolerance (``app.core.numeric_path``)."""
    if manifest.weights_digest != embedder.weights_digest:
        raise ArtifactError(
            f"subspace {manifest.name}/{manifest.version} was fitted on {manifest.model_id} "
            f"(weights sha256 {manifest.weights_digest[:12]}…) but the loaded model is {embedder.model_id} "
            f"(sha256 {embedder.weights_digest[:12]}…); refit it for this model"
        )
    embedder.normalize_layers(manifest.embedding.layers)
    try:
        check_numeric_path(manifest.numeric_path, manifest.probes, subspace, embedder, manifest.embedding,
                           what=f"subspace {manifest.name}/{manifest.version}")
    except NumericPathMismatch as err:
        raise ArtifactError(str(err)) from None
