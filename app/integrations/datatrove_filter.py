"""``SaftFilter``: a datatrove ``BaseFilter`` that keeps the documents ``saft filter`` keeps.

Each batch of documents (``batch_size``, ``filter_batch``) is turned back into the rows they were read from
(``document_row``) and scored in-process by ``app.integrations.local.LocalScorer``, loaded where the pipeline runs, on
the first batch (the model once per process). The verdict lands in ``doc.metadata`` (the ``VERDICT_FIELDS`` that
apply); a harmful document is dropped with the reason ``harmful`` and one that is no valid sample with ``invalid`` (its
reason in ``saft_error``), both written to the ``exclusion_writer`` when one is given.

``row_adapter`` is the reader adapter for files whose rows have no ``text`` (``messages``, ``conversations``,
``prompt``/``response``, preference rows), which datatrove's readers would otherwise skip.

Imported only by pipelines that use it (needs the ``datatrove`` extra); owns no scoring and no item parsing.

Owns: ``SaftFilter``, ``document_row`` and ``row_adapter``. Must not: score, parse or format items itself
(``LocalScorer`` and ``app.core.items`` do), or be imported by the service, the CLI or the Ray engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from app.core.items import ItemError, make_formatter, parse_sample
from app.core.pipeline import json_default
from app.integrations.local import LocalScorer, check_shape, verdict_fields

#: The key of the sample's text in a row as saft reads it (``app.core.items``'s ``text`` shape), and datatrove's default.
TEXT_KEY = "text"


def document_row(doc: Document, text_key: str | None = TEXT_KEY) -> dict[str, Any]:
    """The row ``doc`` was read from: its metadata with ``doc.text`` put back under ``text_key`` (datatrove's readers
    take the text out of the row from there, their ``text_key``), unless the metadata holds that key already (for
    ``row_adapter``'s documents, whose text is not in the row, it holds ``None``). ``text_key=None``: never put back,
    for documents whose text is not part of the sample.

    ``app.core.items`` then reads the row as ``saft filter`` reads the line: a structured shape in the metadata
    (``messages``, ``prompt``/``response``, ``conversations``, …) wins over the text, else the text is the sample.
    """
    row = dict(doc.metadata)
    if text_key is not None and text_key not in row:
        row[text_key] = doc.text
    return row


_render = make_formatter("plain", None)


def row_adapter(self: Any, data: dict[str, Any], path: str, id_in_file: int | str) -> dict[str, Any]:
    """A datatrove reader ``adapter`` (``JsonlReader(..., adapter=row_adapter)``) that reads every row saft reads,
    also rows without a text (``messages``, ``conversations``, ``prompt``/``response``, preference rows), which the
    default adapter hands to the reader without a text, to be skipped.

    A row with a text becomes the document the default adapter makes (the text out of the row, the rest the metadata).
    Any other row stays whole in the metadata, its ``text_key`` set to ``None`` (null is absent to ``app.core.items``, and
    tells ``document_row`` the text is not the row's), and the document's text is a plain rendering of its sample, for
    the pipeline's other steps; or the row as JSON when it is no sample, so that the filter drops it with its reason
    rather than the reader skipping it."""
    metadata = dict(data)
    doc_id = metadata.pop(self.id_key, f"{path}/{id_in_file}")
    text = metadata.pop(self.text_key, None)
    if isinstance(text, str) and text:
        return {"text": text, "id": doc_id, "metadata": metadata}
    metadata[self.text_key] = text
    try:
        rendered = _render(parse_sample(metadata).item)
    except ItemError:
        rendered = orjson.dumps(metadata, default=json_default).decode()
    return {"text": rendered, "id": doc_id, "metadata": metadata}


class SaftFilter(BaseFilter):
    """Drops the documents whose sample scores above its kind's τ (or ``threshold``) and those that are no sample.

    ``subspace``/``version``: the version to load (default: the active version of ``SAFT_SUBSPACE_NAME``);
    ``shape``/``columns``: as ``saft filter --format/--columns``; ``text_key``: the reader's ``text_key`` (``document_row``).
    Settings (model cache, device, batch limits) come from the ``SAFT_*`` environment.
    """

    name = "🛡 SAFT"

    def __init__(self, exclusion_writer: DiskWriter | None = None, batch_size: int = 256, *, subspace: str | None = None,
                 version: str | None = None, threshold: float | None = None, shape: str = "auto",
                 columns: Mapping[str, str] | None = None, text_key: str | None = TEXT_KEY) -> None:
        super().__init__(exclusion_writer, batch_size)
        self.subspace, self.version, self.threshold = subspace, version, threshold
        self.shape, self.columns, self.text_key = check_shape(shape), dict(columns) if columns else None, text_key
        self._scorer: LocalScorer | None = None  # loaded where the pipeline task runs, not where it is built

    @property
    def scorer(self) -> LocalScorer:
        if self._scorer is None:
            self._scorer = LocalScorer(self.subspace, self.version, threshold=self.threshold, shape=self.shape, columns=self.columns)
        return self._scorer

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        results: list[bool | tuple[bool, str]] = []
        for doc, (line, scored) in zip(batch, self.scorer.score_rows([document_row(d, self.text_key) for d in batch]), strict=True):
            doc.metadata.update((k, v) for k, v in verdict_fields(line, scored).items() if v is not None)
            if scored is None:
                results.append((False, "invalid"))
            elif scored.verdict == "drop":
                results.append((False, "harmful"))
            else:
                results.append(True)
        return results
