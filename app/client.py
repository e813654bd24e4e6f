"""``saft score --url``: rows read by ``app.core.lines`` scored through a running service with saft-filter-client.

This module owns the adapter only: a row's canonical turns become the item sent, and the results come back as
the records the in-process ``saft score`` writes (``app.core.pipeline.line_record``). Chunking, concurrency, retries
and refused items are the client package's (``saft_filter_client``); nothing here talks HTTP.

Must not: talk HTTP, chunk or retry (``SaftClient`` does), or parse, merge or write records otherwise than
``app.core.pipeline`` does. It imports ``app.core.pipeline`` and so torch; the client that needs no model stack is
``saft_filter_client`` (an import-linter contract keeps it free of ``app``, torch and numpy).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from saft_filter_client import ItemRefused, SaftClient, Scored

from app.core.pipeline import Line, line_record, merge_sides
from app.core.pipeline import Scored as LineScored

#: The client names a refused item by its place in the items sent (``items[7]: ...``); a record names its line.
_ITEM_PREFIX = re.compile(r"^items(?:\[\d+\]|\.\d+)")


def score_lines(client: SaftClient, lines: Iterable[Line], threshold: float | None = None) -> Iterator[dict[str, Any]]:
    """One record per line, in order, as the in-process ``saft score`` writes them.

    Each item is sent in canonical form (its turns as ``messages``), so the service scores exactly what this process
    read, whatever shape or column mapping the line came in; a preference row is sent as its two sides. An item the
    service refuses (e.g. above its characters per item) makes its line an error record; the other lines go on.
    """
    waiting: deque[Line] = deque()  # lines read, whose results have not all come back

    def items() -> Iterator[dict[str, Any]]:
        for line in lines:
            waiting.append(line)
            for item in line.items:
                yield {"messages": [{"role": role, "content": content} for role, content in item.turns]}

    def ready() -> Iterator[dict[str, Any]]:  # invalid lines at the head need no result
        while waiting and not waiting[0].items:
            yield line_record(waiting.popleft(), None)

    got: list[Scored] = []
    for result in client.iter_scores(items(), threshold=threshold):
        yield from ready()
        got.append(result)
        if len(got) == len(waiting[0].items):
            yield _record(waiting.popleft(), got)
            got = []
    yield from ready()


def _record(line: Line, results: list[Scored]) -> dict[str, Any]:
    refused = [r for r in results if isinstance(r, ItemRefused)]
    if refused:
        return line_record(replace(line, error="; ".join(_ITEM_PREFIX.sub("item", r.error) for r in refused)), None)
    scored = [LineScored(r.score, r.verdict, r.truncated, r.n_tokens, r.threshold, r.probability)
              for r in results if not isinstance(r, ItemRefused)]  # none is: refused lines returned above
    return line_record(line, merge_sides([line], scored)[0])
