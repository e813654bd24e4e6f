"""The one scorer of every pipeline integration, and the ``saft_*`` fields a scored row gains there.

``LocalScorer`` loads the model and a subspace version once, as ``saft filter`` loads them (settings →
``load_version`` → ``Embedder.from_settings`` → ``check_compatible`` → ``direct_embed``; the model once per process),
and scores rows (decoded objects in any ``app.core.items`` shape) with ``app.core.pipeline``'s ``parse_line`` and
``score_lines``: a row gets the verdict ``saft filter`` gives the same line. ``verdict_fields`` is what a pipeline
stores beside the row.

Owns: ``LocalScorer``, the per-process shared embedder, ``check_shape`` and ``VERDICT_FIELDS``/``verdict_fields``.
Must not: score, parse or format in a way of its own (``app.core.pipeline`` and ``app.core.items`` do), or know a
pipeline framework (datatrove and Curator types stay in their modules).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

from app.config import Settings, get_settings
from app.core.embedding import Embedder
from app.core.items import SHAPES, ItemError, Shape
from app.core.pipeline import Line, Scored, direct_embed, parse_line, score_lines
from app.store.artifacts import check_compatible, load_version

#: The fields ``verdict_fields`` gives every row, in order: the score and P(harmful) (None in a version without
#: calibration), keep / drop / rejected, the τ that decided it, the item kind (text / pair) and a rejected row's reason.
#: A preference row also gets ``saft_chosen_score`` and ``saft_rejected_score`` (its verdict is its chosen side's).
VERDICT_FIELDS = ("saft_score", "saft_probability", "saft_verdict", "saft_threshold", "saft_kind", "saft_error")

Reading = Shape | Literal["auto"]


def check_shape(shape: str) -> Reading:
    """``shape`` when ``app.core.items`` reads it ("auto" or one of ``SHAPES``), said at construction rather than on every row."""
    if shape != "auto" and shape not in SHAPES:
        raise ItemError("shape", f"must be 'auto' or one of {', '.join(SHAPES)}, got {shape!r}")
    return cast(Reading, shape)  # checked just above


#: Embedders already loaded in this process, by what ``Embedder.from_settings`` loads: every scorer of a process (each
#: filter of a datatrove pipeline, each task a datatrove executor runs in it) shares one model.
_EMBEDDERS: dict[tuple[Any, ...], Embedder] = {}


def shared_embedder(settings: Settings, model: str) -> Embedder:
    """``Embedder.from_settings(settings, model)``, loaded once per process."""
    key = (model, str(settings.model_cache_dir), settings.device, settings.dtype, settings.num_threads, settings.max_batch_tokens,
           settings.max_batch_size)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = Embedder.from_settings(settings, model)
    return _EMBEDDERS[key]


class LocalScorer:
    """The embedded model and one subspace version (default: the active version of the configured name), in this
    process, scoring rows as ``saft filter`` scores lines."""

    def __init__(self, subspace: str | None = None, version: str | None = None, *, threshold: float | None = None,
                 shape: str = "auto", columns: Mapping[str, str] | None = None, settings: Settings | None = None) -> None:
        settings = settings or get_settings()
        self.shape, self.columns, self.threshold = check_shape(shape), dict(columns) if columns else None, threshold
        self.subspace, self.manifest = load_version(settings.models_dir, subspace or settings.subspace_name, version)
        self.embedder = shared_embedder(settings, self.manifest.model_id)
        check_compatible(self.manifest, self.subspace, self.embedder)
        self.embed = direct_embed(self.embedder)  # from_settings: the configured batch limits

    def score_rows(self, rows: Sequence[Mapping[str, Any] | str]) -> list[tuple[Line, Scored | None]]:
        """Each row (in order) as a ``Line`` numbered from 1, with its verdict, or ``None`` and the reason in
        ``line.error`` for a row that is no valid sample. A ``str`` row is that row's error already (``app.core.lines.batch_rows``
        gives one for a value Python cannot hold)."""
        lines = [Line(i, None, None, None, row) if isinstance(row, str) else parse_line(i, dict(row), self.shape, self.columns)
                 for i, row in enumerate(rows, start=1)]
        return list(score_lines(self.subspace, self.manifest, lines, self.embed, threshold=self.threshold))


def verdict_fields(line: Line, scored: Scored | None) -> dict[str, Any]:
    """The ``VERDICT_FIELDS`` of one scored row (None where a field does not apply), plus a preference row's side scores."""
    if scored is None:
        return {**dict.fromkeys(VERDICT_FIELDS), "saft_verdict": "rejected", "saft_error": line.error}
    return {
        "saft_score": scored.score, "saft_probability": scored.probability, "saft_verdict": scored.verdict,
        "saft_threshold": scored.threshold, "saft_kind": None if line.item is None else line.item.kind, "saft_error": None,
        **{f"saft_{name}_score": side.score for name, side in scored.sides},
    }
