"""Dataset-level operations of the core: read rows (any ``app.core.lines`` format, any ``app.core.items`` shape), fit a
subspace, score items.

Shared by the CLI, the service's refit job and the Ray engine. No HTTP, no queues, no Redis.

Owns: ``Line`` and reading rows into lines, ``FitOptions``/``FitParams`` (one parameter object for ``saft fit`` and a
refit), ``fit_lines``, ``Scored`` and ``score_lines``, the chunk-score-merge helpers (``scorable``, ``merge_back``,
``merge_sides``) and the record shapes (``line_record``, ``filter_record``, ``table_row``). Must not: know HTTP, queues,
Redis or the CLI, or store versions (its callers save what it fits through ``app.store``): import-linter's contracts.
"""

from __future__ import annotations

import base64
import logging
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.core.anchoring import (
    AnchorWeights,
    carry_probability,
    carry_thresholds,
    check_prior,
    combined_accumulator,
    compare,
    pseudo_labels,
)
from app.core.calibration import fit_calibration, probability
from app.core.embedding import Embedder, EmbeddingConfig, Encoded, Pooling, TruncationSide, sha256_files
from app.core.items import Item, ItemError, Sample, Shape, Template, parse_label, parse_sample
from app.core.lines import SAFT_COLUMNS, Record, jsonl_records, open_records
from app.core.manifest import Manifest
from app.core.numeric_path import ProbeCollector
from app.core.quality import ThresholdError, ThresholdPolicy, choose_thresholds, grouped_quality
from app.core.subspace import Balance, Centering, FitError, FitStatistics, MomentAccumulator, Subspace

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Line:
    """One input row: its 1-based number, the raw object, and either an item or the reason it failed.

    ``shape`` is the shape the row was read as (``app.core.items.SHAPES``). A preference row is two samples: ``sides``
    holds both (chosen first) and ``item`` is the chosen one, the side the row's verdict follows (``merge_sides``).
    """

    number: int
    obj: dict[str, Any] | None
    item: Item | None
    label: int | None
    error: str | None
    shape: Shape | None = None
    sides: tuple[tuple[str, Item], ...] = ()

    @property
    def items(self) -> tuple[Item, ...]:
        """What is embedded for the row: nothing (an invalid row), its item, or each side of a preference row."""
        if self.item is None:
            return ()
        return tuple(item for _, item in self.sides) if self.sides else (self.item,)


def parse_line(number: int, raw: bytes | str | dict[str, Any], shape: Shape | Literal["auto"] = "auto",
               columns: Mapping[str, str] | None = None) -> Line:
    """Validate one row: a JSONL line (decoded here) or an already decoded object (a JSON element, a Parquet row,
    used as is). ``shape`` and ``columns`` are ``app.core.items.parse_sample``'s; failures become a ``Line`` with ``error``."""
    if isinstance(raw, dict):
        obj: Any = raw
    else:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            return Line(number, None, None, None, f"invalid JSON: {err}")
    try:
        sample = parse_sample(obj, shape, columns)
        label = parse_label(obj)
    except ItemError as err:
        return Line(number, obj if isinstance(obj, dict) else None, None, None, str(err))
    return Line(number, obj, sample.item, label, None, sample.shape, sample.sides)


def read_records(records: Iterable[Record], shape: Shape | Literal["auto"] = "auto",
                 columns: Mapping[str, str] | None = None) -> Generator[Line, None, None]:
    """The one line reader: every ``app.core.lines`` record as a ``Line``, numbered as its file numbers it."""
    for number, payload, error in records:
        yield Line(number, None, None, None, error) if payload is None else parse_line(number, payload, shape, columns)


def read_lines(stream: Iterable[bytes | str], shape: Shape | Literal["auto"] = "auto",
               columns: Mapping[str, str] | None = None) -> Iterator[Line]:
    """Every non-blank line of a JSONL stream, numbered from 1; blank lines are counted but skipped."""
    return read_records(jsonl_records(stream), shape, columns)


def read_file(path: Path | str, shape: Shape | Literal["auto"] = "auto",
              columns: Mapping[str, str] | None = None) -> Generator[Line, None, None]:
    """Every row of a file in any format ``app.core.lines`` reads (.jsonl[.gz|.zst], .json, .parquet), as ``Line``s.
    A file that cannot be read at all raises ``RecordFileError`` (a ``ValueError``) when iteration reaches it."""
    return read_records(open_records(path), shape, columns)


#: Why fit and crossval refuse a preference row: its label cannot say which of its two samples it is about.
ONE_SAMPLE_PER_LINE = ("item: a preference row (chosen/rejected) holds two samples under one label; a calibration line "
                       "must be one labelled sample: write each side as its own {prompt, response, label} line")


def single_sample(line: Line) -> Line:
    """``line`` for readers that need one labelled sample per line (fit, crossval): a preference row is refused
    there, with its reason, instead of being fitted on one of its sides."""
    return Line(line.number, line.obj, None, None, ONE_SAMPLE_PER_LINE) if line.sides else line


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


# The embedding a fit uses unless told otherwise (CLI and refit API take their defaults from it): layer 16's state
# averaged over the response of a pair (the whole item for a text), at most 512 tokens keeping the end of longer
# items — chosen by the source-held-out search of docs/QUALITY.md (round 3).
DEFAULT_FIT_EMBEDDING = EmbeddingConfig(layers=(16,), pooling="response", template="chat", max_length=512, truncation_side="left")


@dataclass
class FitOptions:
    """What a fit may vary. The defaults reproduce the committed default subspace (see docs/QUALITY.md):
    with labels, a shrinkage discriminant on layer 16's response state, centered per kind, every source
    weighing the same, τ per kind at 5% FPR of source-held-out scores; without labels, the paper's SAFT score on
    the same embedding, τ dropping the top 10%."""

    embedding: EmbeddingConfig = DEFAULT_FIT_EMBEDDING
    method: Literal["auto", "saft", "lda"] = "auto"  # "auto": "lda" when the calibration set is labelled, else "saft"
    k: int = 1
    center: Centering = "kind"
    standardize: bool = True
    shrinkage: float = 0.5
    balance: Balance = "source"
    nuisance: int = 0
    policy: ThresholdPolicy | None = None  # None: fpr:0.05 with labels, drop_rate:0.1 without
    #: "source": with labels and at least two sources, τ and the probability map are chosen on source-held-out
    #: scores (each source scored by a fit without it, ``app.core.crossval``), so they hold on sources the fit never
    #: saw; in-sample scores would set τ too low for new data. "none": on the fit's own (in-sample) scores.
    cross_fit: Literal["none", "source"] = "source"
    #: With a prior (the active version, when it stores its calibration statistics and uses the same embedding):
    #: "combine" adds the upload to what the prior was fitted on — labelled lines as ``labelled_weight`` sources,
    #: unlabeled ones labelled by the prior's verdicts as ``pseudo_weight`` sources (``app.core.anchoring``) — and carries
    #: its τ and P(harmful) over; "replace" fits on the upload alone (unlabeled: the paper's SAFT score).
    mode: Literal["combine", "replace"] = "combine"
    labelled_weight: float = 16.0
    pseudo_weight: float = 0.1

    def resolved(self, labelled: bool) -> FitOptions:
        """The options with "auto" choices made for labelled or unlabelled data."""
        method = self.method if self.method != "auto" else ("lda" if labelled else "saft")
        policy = self.policy or (ThresholdPolicy("fpr", 0.05) if labelled else ThresholdPolicy("drop_rate", 0.1))
        return replace(self, method=method, policy=policy)


_FIT = FitOptions()


def validation_message(errors: Sequence[Mapping[str, Any]], limit: int = 10) -> str:
    """pydantic's errors as one line a caller can act on: ``field.path: why; ...`` (the ``body`` prefix of a request
    body's fields left out, "body: why" for the body itself). The CLI, ``FitParams.of`` and the API's 422 use it."""
    parts = []
    for e in list(errors)[:limit]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else f"body: {msg}")
    return "; ".join(parts)


class FitParams(BaseModel):
    """Every fit parameter as a caller gives it — ``saft fit`` / ``saft crossval``'s options and ``POST
    /subspace/refit``'s query string — with its type, bounds and description in one place; the defaults are
    ``FitOptions``'. ``options()`` is the ``FitOptions`` a fit runs with. Unknown names are refused (a misspelt
    parameter must not silently fit with the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: str = Field(",".join(map(str, _FIT.embedding.layers)), pattern=r"^-?\d+(,-?\d+)*$",
                        description="Comma-separated layer indices (negative from the end).")
    pooling: Pooling = Field(_FIT.embedding.pooling, description="last | mean | response (mean over the final assistant turn)")
    template: Template = Field(_FIT.embedding.template, description="judge (the item inside one fixed 'is this harmful?' "
                               "instruction) | chat | plain")
    max_length: int = Field(_FIT.embedding.max_length, ge=8, le=32768, description="Tokens kept per item.")
    truncation_side: TruncationSide = Field(_FIT.embedding.truncation_side, description="left keeps the end (the response) | "
                                            "right keeps the start")
    method: Literal["auto", "saft", "lda"] = Field(_FIT.method, description="auto: lda when the data is labelled, else saft "
                                                   "(the paper, unsupervised)")
    k: int = Field(_FIT.k, ge=1, le=4096, description="Directions kept.")
    center: Centering = Field(_FIT.center, description="global | kind (each item kind centred on its own benign mean)")
    standardize: bool = Field(_FIT.standardize, description="Per-dimension standardization before the SVD.")
    shrinkage: float = Field(_FIT.shrinkage, ge=0.0, le=1.0, description="lda: covariance shrinkage toward its diagonal.")
    balance: Balance = Field(_FIT.balance, description="item: every line weighs the same; source: every 'source' field "
                             "value weighs the same within its label")
    nuisance: int = Field(_FIT.nuisance, ge=0, le=64, description="lda: directions of between-benign-source spread projected out")
    cross_fit: Literal["none", "source"] = Field(_FIT.cross_fit, description="source: τ and P(harmful) from source-held-out "
                                                 "scores (labelled data with 2+ 'source' values) | none: the fit's own scores")
    policy: str | None = Field(None, description="max_f1 | fpr:R | recall:R | drop_rate:Q (default: fpr:0.05 labelled, "
                               "drop_rate:0.1 not); chosen per item kind")
    mode: Literal["combine", "replace"] = Field(_FIT.mode, description="combine: add the data to the active version's stored "
                                                "calibration (unlabeled lines labelled by its verdicts; τ carried over); "
                                                "replace: fit on the data alone (unlabeled: the paper's SAFT score)")
    labelled_weight: float = Field(_FIT.labelled_weight, gt=0, le=1000, description="combine: how many calibration sources "
                                   "the labelled lines weigh as")
    pseudo_weight: float = Field(_FIT.pseudo_weight, ge=0, le=1000, description="combine: how many calibration sources the "
                                 "unlabeled lines weigh as")

    @field_validator("policy")
    @classmethod
    def _policy_parses(cls, value: str | None) -> str | None:
        if value is not None:
            ThresholdPolicy.parse(value)  # ThresholdError is a ValueError: pydantic reports it under "policy"
        return value

    @classmethod
    def of(cls, **values: Any) -> FitParams:
        """Validated, or FitError naming each bad parameter (``name: why``), as the CLI and the API report it."""
        try:
            return cls(**values)
        except ValidationError as err:
            raise FitError(validation_message(err.errors())) from None

    def options(self) -> FitOptions:
        return FitOptions(
            embedding=EmbeddingConfig(tuple(int(x) for x in self.layers.split(",")), self.pooling, self.template,
                                      self.max_length, self.truncation_side),
            method=self.method, k=self.k, center=self.center, standardize=self.standardize, shrinkage=self.shrinkage,
            balance=self.balance, nuisance=self.nuisance, policy=ThresholdPolicy.parse(self.policy) if self.policy else None,
            cross_fit=self.cross_fit, mode=self.mode, labelled_weight=self.labelled_weight, pseudo_weight=self.pseudo_weight)


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
        self._file: BinaryIO = tempfile.TemporaryFile(prefix="saft-embeddings-")  # noqa: SIM115 (the spool owns it: close())

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


def direct_embed(embedder: Embedder) -> EmbedFn:
    """Embed in the calling thread (CLI, Ray actors) in the embedder's batches (``Embedder.batch_limits``); the
    service passes its batcher-backed function instead."""

    def embed(items: Sequence[Item], config: EmbeddingConfig) -> tuple[list[Encoded], np.ndarray]:
        encoded = embedder.encode_items(items, config)
        return encoded, embedder.embed(encoded, config)

    return embed


Prior = tuple[Subspace, Manifest]


def same_embedding(prior: Prior, embedder: Embedder, config: EmbeddingConfig) -> bool:
    """Whether the prior scores the vectors this fit computes (same weights, same embedding config)."""
    return prior[1].embedding == config and prior[1].weights_digest == embedder.weights_digest


def anchor_of(prior: Prior | None, embedder: Embedder, options: FitOptions, config: EmbeddingConfig) -> tuple[FitStatistics | None, str]:
    """The prior's statistics when this fit combines with them, else None and why not (for the manifest)."""
    if prior is None:
        return None, "no active version"
    if options.mode == "replace":
        return None, "mode=replace"
    if options.mode != "combine":
        raise FitError(f"mode must be 'combine' or 'replace', got {options.mode!r}")
    if options.method == "saft":
        return None, "method=saft fits the paper's score on the upload alone"
    if not same_embedding(prior, embedder, config):
        return None, "the fit's model or embedding differs from the active version's"
    try:
        return check_prior(prior[0]), ""
    except FitError as err:
        return None, str(err)


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
    prior: Prior | None = None,
) -> FitResult:
    """Stream calibration lines into moments, fit, set τ by the policy, and describe it in a manifest.

    An invalid line is rejected with its number and reason, listed in the manifest (``strict``: the
    first one stops the fit at once, before more embedding work is spent). With a ``prior`` (the active
    version), the fit combines with its statistics where it can (``FitOptions.mode``; the upload may then be
    partly labelled) and the manifest's ``refit`` compares the two on the upload.
    """
    config = EmbeddingConfig(**{**options.embedding.as_dict(), "layers": embedder.normalize_layers(options.embedding.layers)})
    anchor, not_combined = anchor_of(prior, embedder, options, config)
    bad: list[str] = []
    first_labelled: list[bool] = []

    def valid(stream: Iterable[Line]) -> Iterator[Line]:
        for line in map(single_sample, stream):
            if line.error is not None:
                if strict:
                    raise FitError(f"calibration line {line.number}: {line.error}")
                bad.append(f"line {line.number}: {line.error}")
                continue
            if not first_labelled:
                first_labelled.append(line.label is not None)
            elif first_labelled[0] != (line.label is not None) and anchor is None:
                raise FitError(f"calibration set mixes labelled and unlabelled lines (line {line.number} differs from the first)")
            yield line

    acc = MomentAccumulator(embedder.dim(config))
    spool = EmbeddingSpool(acc.dim)
    probes = ProbeCollector()
    labels: list[int | None] = []
    meta: dict[str, list[str]] = {"kind": [], "source": [], "item_kind": [], "group": []}
    n_truncated = 0
    try:
        embed = embed or direct_embed(embedder)
        for chunk in chunks(valid(lines), 256):
            encoded, vectors = embed([line.item for line in chunk], config)
            if progress is not None:
                progress(len(chunk))
            kinds = [line.item.kind for line in chunk]
            chunk_labels = [line.label for line in chunk]
            # One cell of d² sums per source only where the fit weighs sources; otherwise one per kind/label.
            by_source = options.balance == "source" or options.nuisance > 0
            sources = [str((line.obj or {}).get("source", "")) for line in chunk] if by_source else None
            acc.update(vectors, kinds, chunk_labels, sources)
            spool.append(vectors)
            probes.offer([line.item for line in chunk], chunk_labels)
            labels.extend(chunk_labels)
            meta["item_kind"].extend(kinds)
            meta["kind"].extend(str((line.obj or {}).get("kind", kind)) for line, kind in zip(chunk, kinds, strict=True))
            meta["source"].extend(str((line.obj or {}).get("source", "unknown")) for line in chunk)
            meta["group"].extend(str((line.obj or {}).get("group", f"line {line.number}")) for line in chunk)
            n_truncated += sum(e.truncated for e in encoded)
        if anchor is not None:
            assert prior is not None
            return _combine(prior, anchor, spool, labels, meta, options, config, acc, bad, n_truncated, probes, embedder,
                            name=name, calibration_digest=calibration_digest, calibration_path=calibration_path)
        options = options.resolved(bool(first_labelled and first_labelled[0]))
        subspace = Subspace(
            k=options.k,
            method=options.method,  # type: ignore[arg-type]  # resolved(): "auto" is decided by now
            center=options.center,
            standardize=options.standardize,
            shrinkage=options.shrinkage,
            balance=options.balance,
            nuisance=options.nuisance,
        ).fit_moments(acc)
        kinds_iter = iter(chunks(meta["item_kind"], 4096))
        scores = np.concatenate([subspace.score_samples(X, next(kinds_iter)) for X in spool.batches(4096)])
        y = np.asarray(labels, dtype=int) if labels and labels[0] is not None else None
        comparison = None
        if prior is not None and same_embedding(prior, embedder, config):  # the same vectors: both versions side by side
            kinds_iter = iter(chunks(meta["item_kind"], 4096))
            old_scores = np.concatenate([prior[0].score_samples(X, next(kinds_iter)) for X in spool.batches(4096)])
            comparison = (old_scores, np.asarray([prior[1].threshold_for(k) for k in meta["item_kind"]]))
        held_out = None
        if options.cross_fit == "source" and y is not None and len(set(meta["source"])) >= 2:
            held_out = _source_held_out(spool, y, meta, options)
        elif options.cross_fit not in ("none", "source"):
            raise FitError(f"cross_fit must be 'none' or 'source', got {options.cross_fit!r}")
    finally:
        spool.close()

    # τ and P(harmful) per kind: on source-held-out scores where the fit cross-fits, else on its own.
    basis = scores if held_out is None else held_out["scores"]
    assert options.policy is not None  # resolved() above chose one
    try:
        threshold, thresholds = choose_thresholds(basis, y, meta["item_kind"], options.policy)
    except ThresholdError as err:
        raise FitError(str(err)) from None
    taus = np.asarray([thresholds.get(kind, threshold) for kind in meta["item_kind"]])
    quality = grouped_quality(y, scores, taus, {"kind": meta["kind"], "source": meta["source"]}) if y is not None else {}
    if held_out is not None:
        quality = {"calibration": quality, "source_held_out": held_out["summary"]}
    elif quality:
        quality = {"calibration": quality}
    # An unlabelled fit has no probability.
    calibrated = fit_calibration(basis, y, meta["item_kind"]) if y is not None else None
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
        quality=quality,
        probability=calibrated,
        numeric_path=embedder.numeric_path,
        probes=probes.probes(scores),
        refit=None if prior is None else {
            "strategy": "saft" if options.method == "saft" else "replace", "mode": options.mode, "not_combined": not_combined,
            "prior": _prior_ref(prior), "upload": {"n": len(labels), "labelled": 0 if y is None else len(labels)},
            "comparison": None if comparison is None else compare(comparison[0], comparison[1], scores, taus, y),
        },
    )
    return FitResult(subspace, manifest, scores, y, meta)


def _prior_ref(prior: Prior) -> dict[str, Any]:
    """The version a refit started from, and the stored statistics it could combine with (weighted counts)."""
    stats: FitStatistics | None = getattr(prior[0], "statistics_", None)
    return {"name": prior[1].name, "version": prior[1].version, "n_samples": prior[1].calibration.get("n_samples"),
            "statistics": None if stats is None else {
                "cells": {f"{kind}/{'unlabelled' if label is None else label}": round(float(n), 3)
                          for (kind, label), (n, _, _) in sorted(stats.sums.items(), key=str)},
                "sources_per_label": {str(label): float(n) for label, n in stats.n_sources.items()}}}


def _combine(prior: Prior, stats: FitStatistics, spool: EmbeddingSpool, labels: list[int | None], meta: dict[str, list[str]],
             options: FitOptions, config: EmbeddingConfig, acc: MomentAccumulator, bad: list[str], n_truncated: int,
             probes: ProbeCollector, embedder: Embedder, *, name: str, calibration_digest: str,
             calibration_path: str) -> FitResult:
    """The prior's statistics plus the upload (labelled lines as given, the rest labelled by the prior's verdicts),
    fitted with the prior's parameters; τ and P(harmful) carried over unless a policy is asked for."""
    old, old_manifest = prior
    X = np.concatenate(list(spool.batches(4096))) if spool.rows else np.empty((0, acc.dim), np.float32)
    kinds = meta["item_kind"]
    if X.shape[0] == 0:
        raise FitError("the upload has no valid line to refit on")
    old_scores = old.score_samples(X, kinds)
    old_taus = np.asarray([old_manifest.threshold_for(k) for k in kinds])
    given = np.asarray([-1 if label is None else label for label in labels], dtype=int)
    pseudo = given < 0
    used = np.where(pseudo, pseudo_labels(old_scores, old_taus), given)
    weights = AnchorWeights(labelled=options.labelled_weight, pseudo=options.pseudo_weight)
    params = old.get_params()
    subspace = Subspace(**params).fit_moments(combined_accumulator(stats, X, kinds, used.tolist(), pseudo.tolist(), weights))
    scores = subspace.score_samples(X, kinds)
    known = ~pseudo
    y_known = given[known]
    if options.policy is None:
        carried = carry_thresholds(old, subspace, stats, {**{k: old_manifest.threshold_for(k) for k in old_manifest.kinds},
                                                          **old_manifest.thresholds})
        threshold = carry_thresholds(old, subspace, stats, {"text": old_manifest.threshold})["text"]
        thresholds, policy, tau_from = carried, old_manifest.threshold_policy, "carried from the prior"
    else:
        policy = options.policy
        needs_labels = policy.kind not in ("drop_rate",)
        rows = known if needs_labels else np.ones(len(kinds), dtype=bool)
        try:
            threshold, thresholds = choose_thresholds(scores[rows], y_known if needs_labels else None,
                                                      [k for k, r in zip(kinds, rows, strict=True) if r], policy)
        except ThresholdError as err:
            raise FitError(f"threshold policy {policy.as_dict()} on the upload: {err}") from None
        tau_from = "the policy on the upload's " + ("labelled lines" if needs_labels else "lines")
    taus = np.asarray([thresholds.get(k, threshold) for k in kinds])
    quality: dict[str, Any] = {}
    if known.any() and 0 < y_known.sum() < y_known.size:
        quality = {"calibration": grouped_quality(y_known, scores[known], taus[known],
                                                  {"kind": [k for k, r in zip(meta["kind"], known, strict=True) if r],
                                                   "source": [s for s, r in zip(meta["source"], known, strict=True) if r]})}
    probability_map = None if old_manifest.probability is None else carry_probability(old, subspace, stats, old_manifest.probability)
    n_known = int(known.sum())
    manifest = Manifest(
        name=name, model_id=old_manifest.model_id, weights_digest=old_manifest.weights_digest, embedding=config,
        method=old_manifest.method, k=int(subspace.components_.shape[0]), center=old_manifest.center,
        standardize=old_manifest.standardize, shrinkage=old_manifest.shrinkage, balance=old_manifest.balance,
        nuisance=old_manifest.nuisance, signed=bool(subspace.signed_), kinds=list(subspace.kinds_),
        threshold=float(threshold), thresholds={k: float(v) for k, v in thresholds.items()}, threshold_policy=policy,
        calibration={"path": calibration_path, "sha256": calibration_digest, "n_samples": int(X.shape[0]),
                     "n_truncated": n_truncated, "counts": acc.counts(), "rejected": {"count": len(bad), "lines": bad[:100]},
                     "prior_n_samples": old_manifest.calibration.get("n_samples")},
        quality=quality, probability=probability_map, numeric_path=embedder.numeric_path, probes=probes.probes(scores),
        refit={
            "strategy": "combined" if n_known == len(kinds) else ("anchored" if n_known == 0 else "partly labelled"),
            "mode": options.mode, "prior": _prior_ref(prior),
            "upload": {"n": len(kinds), "labelled": n_known, "pseudo_labelled": len(kinds) - n_known,
                       "pseudo_labelled_harmful": int(used[pseudo].sum()),
                       "weights": {"labelled": weights.labelled, "pseudo": weights.pseudo}},
            "threshold_from": tau_from,
            "comparison": compare(old_scores, old_taus, scores, taus, given),
        },
    )
    return FitResult(subspace, manifest, scores, given if known.all() else None, meta)


def _source_held_out(spool: EmbeddingSpool, y: np.ndarray, meta: dict[str, list[str]], options: FitOptions) -> dict[str, Any] | None:
    """Each calibration item scored by a fit without its source (``app.core.crossval``), and the summary a manifest keeps."""
    from app.core.crossval import EmbeddedPool, crossval  # crossval builds on this module's FitOptions

    vectors = np.concatenate(list(spool.batches(4096)))
    pool = EmbeddedPool(vectors, y, meta["item_kind"], meta["kind"], meta["source"], meta["group"])
    try:
        result = crossval(pool, options, by="source")
    except FitError as err:  # e.g. each source holds one label only: nothing to hold out
        log.warning("cross-fitting skipped: %s", err)
        return None
    keep = ("n", "n_harmful", "auroc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "fpr_at_threshold", "recall")
    summary: dict[str, Any] = {"by": "source", "n_folds": result["n_folds"],
               "by_kind": {k: {c: m[c] for c in keep if c in m} for k, m in result["metrics"]["by_kind"].items()},
               **{k: result[k] for k in ("worst_benign_source", "worst_harmful_source") if k in result}}
    return {"scores": result["scores"], "summary": summary}


@dataclass(frozen=True, slots=True)
class Scored:
    """The verdict on one item, and the τ that decided it (its kind's, or the caller's override)."""

    score: float
    verdict: str  # "keep" | "drop"
    truncated: bool
    n_tokens: int
    threshold: float
    probability: float | None = None  # calibrated P(harmful); None when the version has no calibration
    sides: tuple[tuple[str, Scored], ...] = ()  # a preference row's sides, each scored as its own pair (merge_sides)


def merge_sides(rows: Sequence[Line | Sample], scored: Sequence[Scored]) -> list[Scored]:
    """The results of ``rows``' ``items`` (flattened, in order) as one ``Scored`` per row.

    A preference row's verdict, score and τ are its **chosen** side's, and both sides ride along in ``sides``: a
    harmful chosen answer is what DPO trains the model towards, so the row is dropped; a harmful rejected answer
    beside a benign chosen one is what a safety preference pair is for, so the row is kept.
    """
    results, out = iter(scored), []
    for row in rows:
        mine = [next(results) for _ in row.items]
        if row.sides:
            out.append(replace(mine[0], sides=tuple((name, s) for (name, _), s in zip(row.sides, mine, strict=True))))
        else:
            out.append(mine[0])
    return out


def side_records(scored: Scored) -> dict[str, dict[str, Any]]:
    """Each side's result of a preference row, by side name (empty for any other row)."""
    return {name: {"score": s.score, "verdict": s.verdict, "threshold": s.threshold, "truncated": s.truncated,
                   "n_tokens": s.n_tokens, **({} if s.probability is None else {"probability": s.probability})}
            for name, s in scored.sides}


def json_default(value: Any) -> Any:
    """JSON for values a Parquet row may hold and JSON lacks (``orjson.dumps(..., default=json_default)``): bytes as
    base64, anything else (decimals, durations) as its string."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    return str(value)


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
        if scored.probability is not None:
            rec["probability"] = scored.probability
        if scored.sides:
            rec["sides"] = side_records(scored)
    return rec


def filter_record(line: Line, scored: Scored | None, shard: str | None = None) -> tuple[str, Any]:
    """Where ``saft filter`` puts a line (``kept`` / ``dropped`` / ``rejected``) and what it writes there.

    Kept lines are written unchanged; a dropped one carries its line number and score (and probability) under ``"saft"``;
    a rejected one its reason. ``shard`` names the input file when a run reads several (the Ray engine),
    so every written line still leads back to its source. Shared by the local and the Ray engine.
    """
    where: dict[str, Any] = {} if shard is None else {"shard": shard}
    if scored is None:
        return "rejected", {**where, "line": line.number, "error": line.error, "item": line.obj}
    if scored.verdict == "keep":
        return "kept", line.obj
    calibrated = {} if scored.probability is None else {"probability": scored.probability}
    sides = {"sides": side_records(scored)} if scored.sides else {}
    return "dropped", {**(line.obj or {}), "saft": {**where, "line": line.number, "score": scored.score, **calibrated, **sides}}


#: The columns ``table_row`` may add to an input row, as Arrow type aliases, in output order.
TABLE_COLUMNS: dict[str, str] = {"saft_line": "int64", **SAFT_COLUMNS, "saft_error": "string",
                                 "saft_chosen_score": "double", "saft_rejected_score": "double"}


def table_row(line: Line, scored: Scored | None) -> dict[str, Any]:
    """The output row (Parquet) of one input row: the row as read, plus its line number and ``saft_score``,
    ``saft_verdict`` (keep / drop / rejected), ``saft_kind``, the error of a rejected row and, for a preference
    row, each side's score."""
    row: dict[str, Any] = {**(line.obj or {}), "saft_line": line.number}
    if scored is None:
        row.update(saft_verdict="rejected", saft_error=line.error)
        return row
    row.update(saft_score=scored.score, saft_verdict=scored.verdict, saft_kind=None if line.item is None else line.item.kind)
    row.update({f"saft_{name}_score": s.score for name, s in scored.sides})
    return row


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
    # Probability is of the score alone: a τ override changes verdicts, never probabilities.
    probs = [None] * len(kinds) if manifest.probability is None else probability(manifest.probability, scores, kinds).tolist()
    return [
        Scored(float(s), "drop" if s > tau else "keep", e.truncated, e.n_tokens, tau, p)
        for s, e, tau, p in zip(scores, encoded, taus, probs, strict=True)
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
    """Every line in input order with its verdict, or ``None`` for a line that failed validation (a preference
    row's both sides are embedded with the rest of its chunk and merged back by ``merge_sides``)."""
    for chunk in chunks(lines, chunk_size):
        valid, items = scorable(chunk)
        item_results: list[Scored] = []
        if items:
            encoded, vectors = embed(items, manifest.embedding)
            item_results = score_encoded(subspace, manifest, items, encoded, vectors, threshold)
        if progress is not None:
            progress(len(chunk))
        yield from merge_back(chunk, valid, item_results)


def scorable(chunk: Sequence[Line]) -> tuple[list[Line], list[Item]]:
    """The valid lines of a chunk, and the items to embed for them (a preference row's two sides in turn). The one
    split of "chunk, score the valid lines, merge back by line number": ``score_lines`` and ``/filter`` use it."""
    valid = [line for line in chunk if line.item is not None]
    return valid, [item for line in valid for item in line.items]


def merge_back(chunk: Sequence[Line], valid: Sequence[Line], item_results: Sequence[Scored]) -> list[tuple[Line, Scored | None]]:
    """Every line of ``chunk`` in order with its verdict (``None`` for a line that is not in ``valid``), from the
    results of ``scorable``'s items; a preference row's two results merge into one (``merge_sides``)."""
    by_number = {line.number: s for line, s in zip(valid, merge_sides(list(valid), list(item_results)), strict=True)}
    return [(line, by_number.get(line.number)) for line in chunk]
