"""``SaftClient`` and ``AsyncSaftClient``: a saft-filter service's routes as Python calls.

Each client owns one httpx connection pool and talks HTTP only: what to send is planned by
``saft_filter_client.chunking``, what is retried is ``saft_filter_client.retry``'s policy, and every body is a
model of ``saft_filter_client.models``, the service's own. The two classes are the same calls, the one on
threads, the other on the event loop; neither imports anything of the service or its model stack.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Literal, Self, TypeVar

import httpx

from saft_filter_client.chunking import (
    Chunker,
    ChunkRequests,
    Entry,
    Item,
    Row,
    Segmenter,
    entry,
    filter_record,
    merge_summaries,
    oversized_row,
    row_line,
)
from saft_filter_client.errors import ItemRefused, SaftError
from saft_filter_client.models import (
    FilterError,
    FilterRecord,
    FilterSummary,
    InfoResponse,
    ItemResult,
    ModerationRequest,
    ModerationResponse,
    ScoreResponse,
)
from saft_filter_client.retry import RetryPolicy

log = logging.getLogger("saft_filter_client")

Scored = ItemResult | ItemRefused
Record = FilterRecord | FilterError | FilterSummary
Emit = Literal["all", "kept", "dropped"]
T = TypeVar("T")

_JSON = {"content-type": "application/json"}
_NDJSON = {"content-type": "application/x-ndjson"}


class _Config:
    """What both clients are configured with, and the parts of each call that do no I/O."""

    def __init__(self, url: str, *, token: str | None, timeout_s: float, concurrency: int, retry: RetryPolicy,
                 max_items_per_request: int | None, filter_segment_rows: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency: must be at least 1, got {concurrency}")
        self.base_url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        self.concurrency = concurrency
        self.retry = retry
        self.max_items_per_request = max_items_per_request
        self.filter_segment_rows = filter_segment_rows
        self.info: InfoResponse | None = None  # GET /info, kept after the first call

    def chunker(self, info: InfoResponse) -> Chunker:
        limit = info.limits.max_items_per_request
        return Chunker(min(limit, self.max_items_per_request or limit), info.limits.max_body_bytes)

    @staticmethod
    def filter_params(emit: Emit, threshold: float | None, format: str,
                      columns: Mapping[str, str] | str | None) -> dict[str, str]:
        params = {"emit": emit, "format": format}
        if threshold is not None:
            params["threshold"] = repr(float(threshold))
        if columns:
            params["columns"] = columns if isinstance(columns, str) else ",".join(f"{k}={v}" for k, v in columns.items())
        return params

    @staticmethod
    def moderation_body(input: str | list[Any], model: str | None) -> bytes:
        # The shared model checks the input's shape here, in OpenAI's terms, before anything is sent.
        request: ModerationRequest[Any] = ModerationRequest.model_validate({"input": input, "model": model})
        return request.model_dump_json(by_alias=True, exclude_unset=True).encode()

    @staticmethod
    def check(response: httpx.Response) -> httpx.Response:
        if response.is_error:
            raise SaftError.from_response(response)
        return response

    @staticmethod
    def results(entries: list[Entry], scored: dict[int, Scored]) -> list[Scored]:
        return [e.refused or scored[e.index] for e in entries]


class _Summaries:
    """The summaries of one run's uploads, merged into the one the caller sees."""

    def __init__(self) -> None:
        self.parts: list[FilterSummary] = []
        self.local_errors = 0

    def add(self, summary: FilterSummary) -> None:
        if self.parts and summary.subspace != self.parts[0].subspace:
            log.warning("the service's subspace changed during the run: %s/%s, then %s/%s (records carry the τ that "
                        "decided them)", self.parts[0].subspace.name, self.parts[0].subspace.version,
                        summary.subspace.name, summary.subspace.version)
        self.parts.append(summary)

    def merged(self) -> FilterSummary:
        return merge_summaries(self.parts, self.local_errors)


def _incomplete() -> SaftError:
    return SaftError(200, "incomplete", "the /filter stream ended before its summary (the connection was cut); "
                     "the records received are valid, the rest of the rows are unaccounted for")


class SaftClient:
    """A client of a saft-filter service, on threads.

    ``score`` sends items in requests sized by the service's ``GET /info`` (items per request, body bytes), at most
    ``concurrency`` at once, and retries 429 / 503 / connection failures by ``retry``; an item the service refuses
    (too large, invalid) comes back as an ``ItemRefused`` in its place while the others are scored.
    ``max_items_per_request`` caps the chunk size below the service's limit. ``filter_stream`` uploads rows to
    ``/filter`` in segments of ``filter_segment_rows`` (within the upload limit) and yields records as they arrive.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 300.0, concurrency: int = 4,
                 retry: RetryPolicy | None = None, max_items_per_request: int | None = None,
                 filter_segment_rows: int = 1024) -> None:
        self._config = _Config(url, token=token, timeout_s=timeout_s, concurrency=concurrency, retry=retry or RetryPolicy(),
                               max_items_per_request=max_items_per_request, filter_segment_rows=filter_segment_rows)
        self._http = httpx.Client(base_url=self._config.base_url, headers=self._config.headers, timeout=self._config.timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, what: str, request: Callable[[], httpx.Response]) -> httpx.Response:
        for attempt in self._config.retry.retrying(what):
            with attempt:
                return self._config.check(request())
        raise AssertionError("unreachable: tenacity reraises the last error")

    def info(self, *, refresh: bool = False) -> InfoResponse:
        """``GET /info``: the model, the active subspace and the request limits (kept after the first call)."""
        if self._config.info is None or refresh:
            response = self._send("GET /info", partial(self._http.get, "/info"))
            self._config.info = InfoResponse.model_validate_json(response.content)
        return self._config.info

    def score(self, items: Iterable[Item], *, threshold: float | None = None) -> list[Scored]:
        """One result per item, in order: an ``ItemResult``, or ``ItemRefused`` for an item the service would not
        score. ``threshold`` overrides τ for every item."""
        return list(self.iter_scores(items, threshold=threshold))

    def iter_scores(self, items: Iterable[Item], *, threshold: float | None = None) -> Iterator[Scored]:
        """``score`` as a generator: items are read as requests are filled, results yielded in order, and no more
        than ``concurrency`` requests are out at once, so an input of any length is scored in bounded memory."""
        chunker = self._config.chunker(self.info())
        max_body = self.info().limits.max_body_bytes
        window: deque[Future[list[Scored]]] = deque()
        with ThreadPoolExecutor(self._config.concurrency, thread_name_prefix="saft-client") as pool:
            try:
                for i, item in enumerate(items):
                    if (full := chunker.add(entry(i, item, max_body))) is not None:
                        window.append(pool.submit(self._score_chunk, full, threshold))
                        if len(window) >= self._config.concurrency:
                            yield from window.popleft().result()
                if (last := chunker.flush()) is not None:
                    window.append(pool.submit(self._score_chunk, last, threshold))
                while window:
                    yield from window.popleft().result()
            finally:
                for future in window:
                    future.cancel()

    def _score_chunk(self, entries: list[Entry], threshold: float | None) -> list[Scored]:
        plan = ChunkRequests(entries, threshold)
        while (body := plan.next_body()) is not None:
            try:
                response = self._send("POST /score", partial(self._http.post, "/score", content=body, headers=_JSON))
            except SaftError as err:
                plan.refused(err)
                continue
            plan.answered(ScoreResponse.model_validate_json(response.content).results)
        return self._config.results(entries, plan.scored)

    def moderate(self, input: str | list[Any], *, model: str | None = None) -> ModerationResponse:
        """``POST /v1/moderations`` (OpenAI's shape): ``input`` a string, strings, or parts (``{"type": "text", ...}``
        or the extension ``{"type": "item", ...}``); ``model`` a subspace as ``NAME`` or ``NAME@vN``. One request:
        at most ``/info``'s ``max_items_per_request`` inputs. An input of the wrong shape raises pydantic's
        ``ValidationError`` (the service's own model) before anything is sent."""
        body = self._config.moderation_body(input, model)
        response = self._send("POST /v1/moderations", partial(self._http.post, "/v1/moderations", content=body, headers=_JSON))
        return ModerationResponse.model_validate_json(response.content)

    def filter_stream(self, rows: Iterable[Row], *, emit: Emit = "all", threshold: float | None = None,
                      format: str = "auto", columns: Mapping[str, str] | str | None = None) -> Iterator[Record]:
        """``POST /filter`` over ``rows`` (mappings, or JSON lines as text): a record per row as it arrives, line
        numbers counted from 1 over the whole input, then one summary of the run.

        Rows go up in segments (``filter_segment_rows``, at most the upload limit each), since an HTTP/1.1 client
        sends a whole body before it reads the answer: records of a segment arrive while the service scores it.
        A row bigger than an upload may be is reported as its line's error. A segment is retried (429, 503,
        connection refused) until its records start; a stream cut after that raises ``SaftError``.
        """
        config, info = self._config, self.info()
        max_bytes = info.limits.max_upload_bytes
        params = config.filter_params(emit, threshold, format, columns)
        segmenter, summaries = Segmenter(config.filter_segment_rows, max_bytes), _Summaries()
        accounted = 0  # rows before the segment being filled: sent, or reported here
        for number, row in enumerate(rows, 1):
            line = row_line(number, row)
            if (error := oversized_row(number, line, max_bytes)) is not None:
                if (pending := segmenter.flush()) is not None:
                    yield from self._segment(pending, accounted, params, summaries)
                    accounted += len(pending)
                summaries.local_errors += 1
                accounted += 1
                yield error
                continue
            if (full := segmenter.add(line)) is not None:
                yield from self._segment(full, accounted, params, summaries)
                accounted += len(full)
        last = segmenter.flush()
        if last is not None or not summaries.parts:
            yield from self._segment(last or [], accounted, params, summaries)
        yield summaries.merged()

    def _segment(self, lines: list[bytes], offset: int, params: dict[str, str], summaries: _Summaries) -> Iterator[Record]:
        body = b"".join(lines)

        def open_stream() -> httpx.Response:
            response = self._http.send(self._http.build_request("POST", "/filter", content=body, params=params, headers=_NDJSON),
                                       stream=True)
            if response.is_error:
                response.read()
                response.close()
            return response

        response = self._send("POST /filter", open_stream)
        try:
            for raw in response.iter_lines():
                if raw.strip():
                    record = filter_record(raw, offset)
                    if isinstance(record, FilterSummary):
                        summaries.add(record)
                        return
                    yield record
        finally:
            response.close()
        raise _incomplete()


class AsyncSaftClient:
    """``SaftClient``'s calls on the event loop: the same chunking, concurrency, retries and results.

    ``score`` and ``filter_stream`` take a sync or an async iterable; ``iter_scores`` and ``filter_stream`` are
    async generators.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 300.0, concurrency: int = 4,
                 retry: RetryPolicy | None = None, max_items_per_request: int | None = None,
                 filter_segment_rows: int = 1024) -> None:
        self._config = _Config(url, token=token, timeout_s=timeout_s, concurrency=concurrency, retry=retry or RetryPolicy(),
                               max_items_per_request=max_items_per_request, filter_segment_rows=filter_segment_rows)
        self._http = httpx.AsyncClient(base_url=self._config.base_url, headers=self._config.headers, timeout=self._config.timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, what: str, request: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        async for attempt in self._config.retry.async_retrying(what):
            with attempt:
                return self._config.check(await request())
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def info(self, *, refresh: bool = False) -> InfoResponse:
        if self._config.info is None or refresh:
            response = await self._send("GET /info", partial(self._http.get, "/info"))
            self._config.info = InfoResponse.model_validate_json(response.content)
        return self._config.info

    async def score(self, items: Iterable[Item] | AsyncIterable[Item], *, threshold: float | None = None) -> list[Scored]:
        return [r async for r in self.iter_scores(items, threshold=threshold)]

    async def iter_scores(self, items: Iterable[Item] | AsyncIterable[Item], *,
                          threshold: float | None = None) -> AsyncIterator[Scored]:
        info = await self.info()
        chunker = self._config.chunker(info)
        window: deque[asyncio.Task[list[Scored]]] = deque()
        try:
            i = 0
            async for item in _aiter(items):
                if (full := chunker.add(entry(i, item, info.limits.max_body_bytes))) is not None:
                    window.append(asyncio.create_task(self._score_chunk(full, threshold)))
                    if len(window) >= self._config.concurrency:
                        for result in await window.popleft():
                            yield result
                i += 1
            if (last := chunker.flush()) is not None:
                window.append(asyncio.create_task(self._score_chunk(last, threshold)))
            while window:
                for result in await window.popleft():
                    yield result
        finally:
            for task in window:
                task.cancel()
            await asyncio.gather(*window, return_exceptions=True)

    async def _score_chunk(self, entries: list[Entry], threshold: float | None) -> list[Scored]:
        plan = ChunkRequests(entries, threshold)
        while (body := plan.next_body()) is not None:
            try:
                response = await self._send("POST /score", partial(self._http.post, "/score", content=body, headers=_JSON))
            except SaftError as err:
                plan.refused(err)
                continue
            plan.answered(ScoreResponse.model_validate_json(response.content).results)
        return self._config.results(entries, plan.scored)

    async def moderate(self, input: str | list[Any], *, model: str | None = None) -> ModerationResponse:
        body = self._config.moderation_body(input, model)
        response = await self._send("POST /v1/moderations",
                                    partial(self._http.post, "/v1/moderations", content=body, headers=_JSON))
        return ModerationResponse.model_validate_json(response.content)

    async def filter_stream(self, rows: Iterable[Row] | AsyncIterable[Row], *, emit: Emit = "all",
                            threshold: float | None = None, format: str = "auto",
                            columns: Mapping[str, str] | str | None = None) -> AsyncIterator[Record]:
        config, info = self._config, await self.info()
        max_bytes = info.limits.max_upload_bytes
        params = config.filter_params(emit, threshold, format, columns)
        segmenter, summaries = Segmenter(config.filter_segment_rows, max_bytes), _Summaries()
        accounted, number = 0, 0
        async for row in _aiter(rows):
            number += 1
            line = row_line(number, row)
            if (error := oversized_row(number, line, max_bytes)) is not None:
                if (pending := segmenter.flush()) is not None:
                    async for record in self._segment(pending, accounted, params, summaries):
                        yield record
                    accounted += len(pending)
                summaries.local_errors += 1
                accounted += 1
                yield error
                continue
            if (full := segmenter.add(line)) is not None:
                async for record in self._segment(full, accounted, params, summaries):
                    yield record
                accounted += len(full)
        last = segmenter.flush()
        if last is not None or not summaries.parts:
            async for record in self._segment(last or [], accounted, params, summaries):
                yield record
        yield summaries.merged()

    async def _segment(self, lines: list[bytes], offset: int, params: dict[str, str],
                       summaries: _Summaries) -> AsyncIterator[Record]:
        body = b"".join(lines)

        async def open_stream() -> httpx.Response:
            request = self._http.build_request("POST", "/filter", content=body, params=params, headers=_NDJSON)
            response = await self._http.send(request, stream=True)
            if response.is_error:
                await response.aread()
                await response.aclose()
            return response

        response = await self._send("POST /filter", open_stream)
        try:
            async for raw in response.aiter_lines():
                if raw.strip():
                    record = filter_record(raw, offset)
                    if isinstance(record, FilterSummary):
                        summaries.add(record)
                        return
                    yield record
        finally:
            await response.aclose()
        raise _incomplete()


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
