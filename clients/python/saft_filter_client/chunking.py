"""Request planning without I/O: items into /score requests that fit the service's ``/info`` limits, the
service's item-level refusals read back into per-item results, and rows into /filter uploads.

Shared by the sync and the async client, which only send what this module plans. Nothing here talks to the
network, sleeps or retries.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from saft_filter_client.errors import ItemRefused, SaftError
from saft_filter_client.models import FilterError, FilterRecord, FilterSummary, ItemIn, ItemResult

#: Room kept in a request body beyond its items: ``{"items":[...],"threshold":...}``.
_ENVELOPE_BYTES = 64
#: The start of one item's part in the service's error messages: ``items[3]: ...`` (its size checks) or
#: ``items.3.messages.0.role: ...`` (request validation, several joined by "; ").
_ITEM_ERROR = re.compile(r"(?:^|; )items(?:\[(\d+)\]|\.(\d+))(?=[.:\[])")

Item = Mapping[str, Any] | ItemIn
Row = Mapping[str, Any] | str | bytes


def dumps(value: Any) -> bytes:
    """Compact JSON, as the service reads it (NaN refused: JSON has none)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class Entry:
    """One item ready to send: its position in the input, its id, its JSON, and how many items it counts as
    against ``max_items_per_request`` (a preference row is its two sides, as the service counts it)."""

    index: int
    id: str | int | None
    body: bytes
    weight: int
    refused: ItemRefused | None = None  # refused before sending: rides in its chunk to keep its place, never sent


def entry(index: int, item: Item, max_body_bytes: int) -> Entry:
    """``item`` ready to send, or refused here if no request body can carry it (the service would refuse the
    request whole, naming no item)."""
    if not isinstance(item, ItemIn | Mapping):
        raise TypeError(f"items[{index}]: an item is a mapping or an ItemIn, not {type(item).__name__}")
    payload = item.model_dump(mode="json", by_alias=True, exclude_unset=True) if isinstance(item, ItemIn) else dict(item)
    item_id = payload.get("id") if isinstance(payload.get("id"), str | int) else None
    body = dumps(payload)
    if len(body) > max_body_bytes - _ENVELOPE_BYTES:
        refused = ItemRefused(index=index, id=item_id, status_code=413, type="too_large",
                              error=f"items[{index}]: {len(body)} bytes of JSON exceed what a request body of at most "
                                    f"{max_body_bytes} bytes can carry")
        return Entry(index, item_id, b"", 0, refused)
    sides = payload.get("chosen") is not None and payload.get("rejected") is not None
    return Entry(index, item_id, body, 2 if sides else 1)


class Chunker:
    """Packs entries, in order, into requests of at most ``max_items`` items and ``max_bytes`` of body."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        if max_items < 1:
            raise ValueError(f"max_items: must be at least 1, got {max_items}")
        self.max_items, self.max_bytes = max_items, max_bytes - _ENVELOPE_BYTES
        self._chunk: list[Entry] = []
        self._items = self._bytes = 0

    def add(self, e: Entry) -> list[Entry] | None:
        """Add ``e``; the chunk it closed, if it did not fit in the current one."""
        full = None
        if self._chunk and (self._items + e.weight > self.max_items or self._bytes + len(e.body) + 1 > self.max_bytes):
            full = self.flush()
        self._chunk.append(e)
        self._items += e.weight
        self._bytes += len(e.body) + (e.refused is None)
        return full

    def flush(self) -> list[Entry] | None:
        chunk, self._chunk, self._items, self._bytes = self._chunk, [], 0, 0
        return chunk or None


def score_body(entries: list[Entry], threshold: float | None) -> bytes:
    return b'{"items":[' + b",".join(e.body for e in entries) + b'],"threshold":' + dumps(threshold) + b"}"


class ChunkRequests:
    """One chunk's /score requests without I/O: the chunk as one request, split again on each refusal that names
    items (or is too large and names none), until every entry has its result. Both clients drive it the same way::

        plan = ChunkRequests(entries, threshold)
        while (body := plan.next_body()) is not None:
            try: response = send(body)
            except SaftError as err: plan.refused(err); continue
            plan.answered(results_of(response))
    """

    def __init__(self, entries: list[Entry], threshold: float | None) -> None:
        self.scored: dict[int, ItemResult | ItemRefused] = {}
        self._threshold = threshold
        self._todo = [[e for e in entries if e.refused is None]]
        self._part: list[Entry] = []

    def next_body(self) -> bytes | None:
        """The next request body to send, or None when every entry is answered."""
        while self._todo:
            self._part = self._todo.pop()
            if self._part:
                return score_body(self._part, self._threshold)
        return None

    def answered(self, results: list[ItemResult]) -> None:
        """The results of the request ``next_body`` gave, in its order."""
        self.scored.update((e.index, r) for e, r in zip(self._part, results, strict=True))

    def refused(self, err: SaftError) -> None:
        """That request's error: its named items refused, the rest sent again (an error naming none is raised)."""
        refused, again = refusals(self._part, err)
        self.scored.update((r.index, r) for r in refused)
        self._todo.extend(again)


def refusals(entries: list[Entry], err: SaftError) -> tuple[list[ItemRefused], list[list[Entry]]]:
    """Read a refused /score request: the items its error names (refused, with their part of the message) and the
    requests to send instead. An oversized request that names no item is split in two until it does, or until a
    single item is left (that item is the one too large). Anything else is the whole request's error: raised."""
    if err.status_code not in (413, 422):
        raise err
    named: dict[int, list[str]] = {}
    matches = list(_ITEM_ERROR.finditer(err.message))
    ends = [m.start() for m in matches[1:]] + [len(err.message)] * bool(matches)  # a part runs to the next item's
    for m, end in zip(matches, ends, strict=True):
        position = int(m.group(1) or m.group(2))
        if position < len(entries):
            named.setdefault(position, []).append(err.message[m.start():end].removeprefix("; "))
    if named:
        refused = [ItemRefused(index=entries[p].index, id=entries[p].id, status_code=err.status_code, type=err.type,
                               error=_renumber("; ".join(parts), p, entries[p].index)) for p, parts in sorted(named.items())]
        rest = [e for p, e in enumerate(entries) if p not in named]
        return refused, [rest] if rest else []
    if err.status_code == 413 and len(entries) > 1:
        half = len(entries) // 2
        return [], [entries[:half], entries[half:]]
    if err.status_code == 413:
        e = entries[0]
        return [ItemRefused(index=e.index, id=e.id, status_code=err.status_code, type=err.type, error=err.message)], []
    raise err


def _renumber(message: str, position: int, index: int) -> str:
    """The service names an item by its place in the request; the caller knows it by its place in the input."""
    return re.sub(rf"\bitems(\[{position}\]|\.{position})(?=[.:\[])",
                  lambda m: f"items[{index}]" if m.group(1).startswith("[") else f"items.{index}", message)


# --- /filter ----------------------------------------------------------------------------------------------
def row_line(number: int, row: Row) -> bytes:
    """One NDJSON line of an upload: a mapping as JSON, or a line given as text, sent as it is."""
    if isinstance(row, Mapping):
        raw = dumps(dict(row))
    elif isinstance(row, str | bytes):
        raw = (row.encode() if isinstance(row, str) else row).rstrip(b"\r\n")
        if b"\n" in raw:
            raise ValueError(f"rows[{number - 1}]: a row given as text must be one line; it holds a newline")
    else:
        raise TypeError(f"rows[{number - 1}]: a row is a mapping or one JSON line, not {type(row).__name__}")
    return raw + b"\n"


class Segmenter:
    """Cuts an upload into /filter requests of at most ``max_rows`` rows and ``max_bytes`` bytes each, so a stream
    of any length fits the service's upload limit and records start coming back after the first segment."""

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self._lines: list[bytes] = []
        self._bytes = 0

    def add(self, line: bytes) -> list[bytes] | None:
        full = None
        if self._lines and (len(self._lines) >= self.max_rows or self._bytes + len(line) > self.max_bytes):
            full = self.flush()
        self._lines.append(line)
        self._bytes += len(line)
        return full

    def flush(self) -> list[bytes] | None:
        lines, self._lines, self._bytes = self._lines, [], 0
        return lines or None


def oversized_row(number: int, line: bytes, max_bytes: int) -> FilterError | None:
    """A row bigger than a whole upload may be: reported as its line's error (the service could not say it)."""
    if len(line) > max_bytes:
        return FilterError(line=number, error=f"line: {len(line)} bytes exceed the upload limit of {max_bytes} bytes")
    return None


def filter_record(raw: str | bytes, offset: int) -> FilterRecord | FilterError | FilterSummary:
    """One record of a /filter stream, its line number counted from the start of the whole run."""
    obj = json.loads(raw)
    if obj.get("summary") is True:
        return FilterSummary.model_validate(obj)
    if isinstance(obj.get("line"), int):
        obj["line"] += offset
    return FilterError.model_validate(obj) if "error" in obj else FilterRecord.model_validate(obj)


def merge_summaries(summaries: Iterable[FilterSummary], local_errors: int = 0) -> FilterSummary:
    """One summary for a run sent as several uploads: counts summed, complete only if every upload was; the
    subspace is the first upload's (``SaftClient.filter_stream`` warns if a later one differs)."""
    parts = list(summaries)
    if not parts:
        raise ValueError("no summary: nothing was uploaded")
    shapes: Counter[str] = Counter()
    for s in parts:
        shapes.update(s.shapes)
    return FilterSummary(total=sum(s.total for s in parts) + local_errors, kept=sum(s.kept for s in parts),
                         dropped=sum(s.dropped for s in parts), rejected=sum(s.rejected for s in parts) + local_errors,
                         subspace=parts[0].subspace, complete=all(s.complete for s in parts), shapes=dict(shapes))
