"""The manifest of a subspace version: everything needed to reproduce and trust it, and its JSON form.

Owns: the ``Manifest`` record (what ``saft fit`` and a refit produce beside the basis) and ``ArtifactError``.
Must not: read or write files (``app.store.artifacts`` does), or know the registry, HTTP or Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast, get_args

from app.core.embedding import EmbeddingConfig
from app.core.items import ItemError
from app.core.numeric_path import REFERENCE_PATH, NumericPath, Probe
from app.core.quality import ThresholdPolicy
from app.core.subspace import Balance, Centering, Method, SubspaceParams

FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A subspace artifact is missing, malformed, or does not match the loaded model."""


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
    #: score → P(harmful) per item kind (``app.core.calibration``), fitted on labelled calibration items; None for
    #: unlabelled fits and every version before calibrated probabilities (their manifests have no "probability").
    probability: dict[str, Any] | None = None
    #: How a refit on an upload came about (``app.core.pipeline.fit_lines`` with a prior): the strategy, the version it
    #: started from, the upload's counts, and both versions compared on it; the service adds its activation decision.
    refit: dict[str, Any] | None = None
    #: The arithmetic the fit's vectors came from; versions before it was recorded ran on ``REFERENCE_PATH``.
    numeric_path: NumericPath = REFERENCE_PATH
    #: A few calibration items with the fit's scores: loading on another path re-scores them (``check_numeric_path``).
    probes: list[Probe] = field(default_factory=list)

    def subspace_params(self) -> SubspaceParams:
        """The ``Subspace`` parameters this version was fitted with; ``ArtifactError`` for a value this build lacks."""
        for field_name, value, allowed in (("method", self.method, Method), ("center", self.center, Centering),
                                           ("balance", self.balance, Balance)):
            if value not in get_args(allowed):
                raise ArtifactError(f"manifest field subspace.{field_name}={value!r} is not one of {list(get_args(allowed))}")
        return {"k": self.k, "method": cast(Method, self.method), "center": cast(Centering, self.center),
                "standardize": self.standardize, "shrinkage": self.shrinkage, "balance": cast(Balance, self.balance),
                "nuisance": self.nuisance}

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
            "numeric_path": self.numeric_path.as_dict(),
            "probes": [probe.to_json() for probe in self.probes],
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
                numeric_path=NumericPath.from_dict(data["numeric_path"]) if "numeric_path" in data else REFERENCE_PATH,
                probes=[Probe.from_json(probe) for probe in data.get("probes", [])],
            )
        except ItemError as err:
            raise ArtifactError(f"manifest field probes: {err.field}: {err.message}") from None
        except ValueError as err:  # a probe score that is not a number
            raise ArtifactError(f"manifest field probes: {err}") from None
        except (KeyError, TypeError) as err:
            raise ArtifactError(f"manifest is malformed: missing or wrong field {err}") from None
