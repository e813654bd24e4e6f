"""Dataset-level operations of the core: read JSONL lines, fit a subspace, score items.

Shared by the CLI, the service's refit job and the Ray engine. No HTTP, no queues, no Redis.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from app.artifacts import Manifest
from app.embedding import Embedder, EmbeddingConfig, Encoded, sha256_files
from app.items import Item, ItemError, parse_item, parse_label
from app.quality import ThresholdError, ThresholdPolicy, choose_thresholds, grouped_quality
from app.subspace import FitError, MomentAccumulator, Subspace

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Line:
    """One input line: its 1-based number, the raw object, and either an item or the reason it failed."""

    number: int
    obj: dict[str, Any] | None
    item: Item | None
    label: int | None
    error: str | None


def parse_line(number: int, raw: bytes | str) -> Line:
    """Decode and validate one JSONL line; failures become a ``Line`` with ``error`` set."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        return Line(number, None, None, None, f"invalid JSON: {err}")
    try:
        item = parse_item(obj)
        label = parse_label(obj)
    except ItemError as err:
        return Line(number, obj if isinstance(obj, dict) else None, None, None, str(err))
    return Line(number, obj, item, label, None)


def read_lines(stream: Iterable[bytes | str]) -> Iterator[Line]:
    """Every non-blank line of a JSONL stream, numbered from 1; blank lines are counted but skipped."""
    for number, raw in enumerate(stream, start=1):
        if isinstance(raw, bytes):
            raw = raw.rstrip(b"\r\n")
        else:
            raw = raw.rstrip("\r\n")
        if raw.strip():
            yield parse_line(number, raw)


def file_digest(path: Path) -> str:
    return sha256_files([path])


def chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for x in iterable:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# The embedding a fit uses unless told otherwise (CLI and refit API take their defaults from it): layer 20's
# mean state over at most 512 tokens, keeping the end of longer items — 256 cut the response of too many pairs.
DEFAULT_FIT_EMBEDDING = EmbeddingConfig(layers=(20,), pooling="mean", template="chat", max_length=512, truncation_side="left")


@dataclass
class FitOptions:
    """What a fit may vary. The defaults reproduce the committed default subspace (see docs/QUALITY.md):
    with labels, a shrinkage discriminant on layer 20's mean state, centered per kind, τ at 5% FPR;
    without labels, the paper's SAFT score on the same embedding, τ dropping the top 10%."""

    embedding: EmbeddingConfig = DEFAULT_FIT_EMBEDDING
    method: str = "auto"  # "auto": "lda" when the calibration set is labelled, else "saft"
    k: int = 1
    center: str = "kind"
    standardize: bool = True
    shrinkage: float = 0.5
    balance: str = "item"
    nuisance: int = 0
    policy: ThresholdPolicy | None = None  # None: fpr:0.05 with labels, drop_rate:0.1 without

    def resolved(self, labelled: bool) -> FitOptions:
        """The options with "auto" choices made for labelled or unlabelled data."""
        method = self.method if self.method != "auto" else ("lda" if labelled else "saft")
        policy = self.policy or (ThresholdPolicy("fpr", 0.05) if labelled else ThresholdPolicy("drop_rate", 0.1))
        return replace(self, method=method, policy=policy)


@dataclass
class FitResult:
    subspace: Subspace
    manifest: Manifest
    scores: np.ndarray
    labels: np.ndarray | None
    meta: dict[str, list[str]]


class EmbeddingSpool:
    """Embeddings of a fit written to a temp file, so thresholds can be set without holding N×d in RAM."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.rows = 0
        self._file: BinaryIO = tempfile.TemporaryFile(prefix="saft-embeddings-")

    def append(self, X: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(X, dtype=np.float32).tobytes())
        self.rows += X.shape[0]

    def batches(self, size: int = 4096) -> Iterator[np.ndarray]:
        self._file.flush()
        self._file.seek(0)
        for start in range(0, self.rows, size):
            n = min(size, self.rows - start)
            yield np.frombuffer(self._file.read(n * self.dim * 4), dtype=np.float32).reshape(n, self.dim)

    def close(self) -> None:
        self._file.close()


EmbedFn = Callable[[Sequence[Item], EmbeddingConfig], tuple[list[Encoded], np.ndarray]]


def direct_embed(embedder: Embedder, *, max_batch_tokens: int = 8192, max_batch_size: int = 32) -> EmbedFn:
    """Embed in the calling thread (CLI, Ray actors); the service passes its batcher-backed function instead."""

    def embed(items: Sequence[Item], config: EmbeddingConfig) -> tuple[list[Encoded], np.ndarray]:
        encoded = embedder.encode_items(items, config)
        return encoded, embedder.embed(encoded, config, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size)

    return embed


def fit_lines(
    embedder: Embedder,
    lines: Iterable[Line],
    options: FitOptions,
    *,
    name: str,
    calibration_digest: str,
    calibration_path: str = "",
    progress: Progress | None = None,
    embed: EmbedFn | None = None,
    strict: bool = False,
) -> FitResult:
    """Stream calibration lines into moments, fit, set τ by the policy, and describe it in a manifest.

    An invalid line is rejected with its number and reason, listed in the manifest (``strict``: the
    first one stops the fit at once, before more embedding work is spent).
    """
    config = EmbeddingConfig(**{**options.embedding.as_dict(), "layers": embedder.normalize_layers(options.embedding.layers)})
    bad: list[str] = []
    first_labelled: list[bool] = []

    def valid(stream: Iterable[Line]) -> Iterator[Line]:
        for line in stream:
            if line.error is not None:
                if strict:
                    raise FitError(f"calibration line {line.number}: {line.error}")
                bad.append(f"line {line.number}: {line.error}")
                continue
            if not first_labelled:
                first_labelled.append(line.label is not None)
            elif first_labelled[0] != (line.label is not None):
                raise FitError(f"calibration set mixes labelled and unlabelled lines (line {line.number} differs from the first)")
            yield line

    acc = MomentAccumulator(embedder.dim(config))
    spool = EmbeddingSpool(acc.dim)
    labels: list[int | None] = []
    meta: dict[str, list[str]] = {"kind": [], "source": [], "item_kind": []}
    n_truncated = 0
    try:
        embed = embed or direct_embed(embedder)
        for chunk in chunks(valid(lines), 256):
            encoded, vectors = embed([line.item for line in chunk], config)  # type: ignore[misc]
            if progress is not None:
                progress(len(chunk))
            kinds = [line.item.kind for line in chunk]  # type: ignore[union-attr]
            chunk_labels = [line.label for line in chunk]
            # One cell of d² sums per source only where the fit weighs sources; otherwise one per kind/label.
            by_source = options.balance == "source" or options.nuisance > 0
            sources = [str((line.obj or {}).get("source", "")) for line in chunk] if by_source else None
            acc.update(vectors, kinds, chunk_labels, sources)
            spool.append(vectors)
            labels.extend(chunk_labels)
            meta["item_kind"].extend(kinds)
            meta["kind"].extend(str((line.obj or {}).get("kind", kind)) for line, kind in zip(chunk, kinds, strict=True))
            meta["source"].extend(str((line.obj or {}).get("source", "unknown")) for line in chunk)
            n_truncated += sum(e.truncated for e in encoded)
        options = options.resolved(bool(first_labelled and first_labelled[0]))
        subspace = Subspace(
            k=options.k,
            method=options.method,  # type: ignore[arg-type]
            center=options.center,  # type: ignore[arg-type]
            standardize=options.standardize,
            shrinkage=options.shrinkage,
            balance=options.balance,  # type: ignore[arg-type]
            nuisance=options.nuisance,
        ).fit_moments(acc)
        kinds_iter = iter(chunks(meta["item_kind"], 4096))
        scores = np.concatenate([subspace.score_samples(X, next(kinds_iter)) for X in spool.batches(4096)])
    finally:
        spool.close()

    y = np.asarray(labels, dtype=int) if labels and labels[0] is not None else None
    try:
        threshold, thresholds = choose_thresholds(scores, y, meta["item_kind"], options.policy)
    except ThresholdError as err:
        raise FitError(str(err)) from None
    taus = np.asarray([thresholds.get(kind, threshold) for kind in meta["item_kind"]])
    quality = grouped_quality(y, scores, taus, {"kind": meta["kind"], "source": meta["source"]}) if y is not None else {}
    manifest = Manifest(
        name=name,
        model_id=embedder.model_id,
        weights_digest=embedder.weights_digest,
        embedding=config,
        method=options.method,
        k=int(subspace.components_.shape[0]),
        center=options.center,
        standardize=options.standardize,
        shrinkage=options.shrinkage,
        balance=options.balance,
        nuisance=options.nuisance,
        signed=bool(subspace.signed_),
        kinds=list(subspace.kinds_),
        threshold=threshold,
        thresholds=thresholds,
        threshold_policy=options.policy,
        calibration={
            "path": calibration_path,
            "sha256": calibration_digest,
            "n_samples": acc.n,
            "n_truncated": n_truncated,
            "counts": acc.counts(),
            "rejected": {"count": len(bad), "lines": bad[:100]},
        },
        quality={"calibration": quality} if quality else {},
    )
    return FitResult(subspace, manifest, scores, y, meta)


@dataclass(frozen=True, slots=True)
class Scored:
    """The verdict on one item, and the τ that decided it (its kind's, or the caller's override)."""

    score: float
    verdict: str  # "keep" | "drop"
    truncated: bool
    n_tokens: int
    threshold: float


def line_record(line: Line, scored: Scored | None) -> dict[str, Any]:
    """The output record of one input line: its number and id, then the verdict or the error."""
    rec: dict[str, Any] = {"line": line.number}
    if line.obj is not None and "id" in line.obj:
        rec["id"] = line.obj["id"]
    if scored is None:
        rec["error"] = line.error
    else:
        rec.update(score=scored.score, verdict=scored.verdict, threshold=scored.threshold, truncated=scored.truncated,
                   n_tokens=scored.n_tokens)
    return rec


def filter_record(line: Line, scored: Scored | None, shard: str | None = None) -> tuple[str, Any]:
    """Where ``saft filter`` puts a line (``kept`` / ``dropped`` / ``rejected``) and what it writes there.

    Kept lines are written unchanged; a dropped one carries its line number and score under ``"saft"``;
    a rejected one its reason. ``shard`` names the input file when a run reads several (the Ray engine),
    so every written line still leads back to its source. Shared by the local and the Ray engine.
    """
    where: dict[str, Any] = {} if shard is None else {"shard": shard}
    if scored is None:
        return "rejected", {**where, "line": line.number, "error": line.error, "item": line.obj}
    if scored.verdict == "keep":
        return "kept", line.obj
    return "dropped", {**(line.obj or {}), "saft": {**where, "line": line.number, "score": scored.score}}


def score_encoded(
    subspace: Subspace,
    manifest: Manifest,
    items: Sequence[Item],
    encoded: Sequence[Encoded],
    vectors: np.ndarray,
    threshold: float | None = None,
) -> list[Scored]:
    """Scores and verdicts for embedded items, each against its kind's τ; ``threshold`` overrides them all."""
    kinds = [item.kind for item in items]
    scores = subspace.score_samples(vectors, kinds)
    taus = [manifest.threshold_for(kind) if threshold is None else threshold for kind in kinds]
    return [
        Scored(float(s), "drop" if s > tau else "keep", e.truncated, e.n_tokens, tau)
        for s, e, tau in zip(scores, encoded, taus, strict=True)
    ]


def score_lines(
    subspace: Subspace,
    manifest: Manifest,
    lines: Iterable[Line],
    embed: EmbedFn,
    *,
    threshold: float | None = None,
    chunk_size: int = 256,
    progress: Progress | None = None,
) -> Iterator[tuple[Line, Scored | None]]:
    """Every line in input order with its verdict, or ``None`` for a line that failed validation."""
    for chunk in chunks(lines, chunk_size):
        valid = [line for line in chunk if line.item is not None]
        results: dict[int, Scored] = {}
        if valid:
            items = [line.item for line in valid]
            encoded, vectors = embed(items, manifest.embedding)  # type: ignore[arg-type]
            scored = score_encoded(subspace, manifest, items, encoded, vectors, threshold)  # type: ignore[arg-type]
            results = {line.number: s for line, s in zip(valid, scored, strict=True)}
        if progress is not None:
            progress(len(chunk))
        for line in chunk:
            yield line, results.get(line.number)
