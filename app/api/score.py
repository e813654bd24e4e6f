"""POST /score and POST /filter.

Owns: both routes, the /filter upload (spooled to a temp file, gzip inflated within the upload limit), its numbered
lines read incrementally, the streaming response that cancels the work of a client who left, and the stream's
summary. Must not: embed, score or decide verdicts (``ScoringService.score`` does; sides and records are merged by
``app.core.pipeline``), or hold a whole upload in memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Literal

import anyio
import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from app import metrics
from app.api.deps import get_service, require_client
from app.api.errors import BodyTimeout, PayloadTooLarge, UnsupportedEncoding
from app.api.schemas import FilterSummary, ItemResult, ScoreRequest, ScoreResponse, SubspaceRef
from app.core.items import ItemError, Shape, parse_columns
from app.core.lines import LineSplitter, Record
from app.core.pipeline import Line, line_record, merge_back, merge_sides, parse_line, scorable, side_records
from app.serving.errors import ItemTooLarge
from app.serving.service import ScoringService
from app.store.registry import ActiveSubspace

log = logging.getLogger(__name__)
router = APIRouter(tags=["scoring"], dependencies=[Depends(require_client)])


class UploadSpool:
    """The upload, received eagerly into a temp file while lines are scored from it.

    Receiving eagerly means ``receive()`` is always being awaited, so a client that leaves is seen
    at once (uvicorn reports it only there); spooling to disk keeps memory flat whatever the size.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.file = tempfile.TemporaryFile(prefix="saft-upload-")  # noqa: SIM115 (the spool owns it; its owner closes it)
        self.written = 0
        self.done = False
        self.error: Exception | None = None
        self.changed = asyncio.Event()

    async def pump(self, receive: Receive, on_disconnect: Callable[[], None]) -> None:
        while True:
            try:
                message = await receive()
            except BodyTimeout as err:  # the client stalled: score what came, then say so in the stream
                self.error, self.done = err, True
                self.changed.set()
                return
            if message["type"] == "http.disconnect":
                on_disconnect()
                return
            if self.done:
                continue
            body = message.get("body", b"")
            if self.written + len(body) > self.max_bytes:
                self.error = PayloadTooLarge(f"body: upload exceeds the limit of {self.max_bytes} bytes")
                self.done = True
            else:
                os.pwrite(self.file.fileno(), body, self.written)
                self.written += len(body)
                self.done = not message.get("more_body", False)
            self.changed.set()

    async def chunks(self, size: int = 1 << 16) -> AsyncIterator[bytes]:
        position = 0
        while True:
            if position < self.written:
                chunk = os.pread(self.file.fileno(), min(size, self.written - position), position)
                position += len(chunk)
                yield chunk
                continue
            if self.done:
                if self.error is not None:
                    raise self.error
                return
            self.changed.clear()
            await self.changed.wait()

    def append(self, data: bytes) -> None:
        """Add bytes produced here (an inflated upload), against the same limit as received ones."""
        if self.written + len(data) > self.max_bytes:
            raise PayloadTooLarge(f"body: upload exceeds the limit of {self.max_bytes} bytes once decompressed")
        os.pwrite(self.file.fileno(), data, self.written)
        self.written += len(data)

    def close(self) -> None:
        self.file.close()


class GzipInflater:
    """Inflates a gzip body piece by piece into a spool: at most ``piece`` bytes are in memory at once, and the
    spool's limit applies to the inflated bytes, so a zip bomb stops at the limit. Concatenated members are one
    stream, as gzip itself reads them."""

    def __init__(self, spool: UploadSpool, piece: int = 1 << 20) -> None:
        self.spool, self.piece = spool, piece
        self.received = 0
        self._gz = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        self._started = False

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.spool.max_bytes:
            raise PayloadTooLarge(f"body: upload exceeds the limit of {self.spool.max_bytes} bytes")
        try:
            while data:
                self._started = True
                self.spool.append(self._gz.decompress(data, self.piece))
                if self._gz.eof:  # the next member, if any, starts in unused_data
                    data, self._gz, self._started = self._gz.unused_data, zlib.decompressobj(wbits=zlib.MAX_WBITS | 16), False
                else:
                    data = self._gz.unconsumed_tail
        except zlib.error as err:
            raise ItemError("body", f"is not valid gzip ({err}); Content-Encoding: gzip needs a gzip-compressed body") from None

    def finish(self) -> None:
        if self._started:
            self.spool.append(self._gz.flush())
            if not self._gz.eof:
                raise ItemError("body", "the gzip stream ends early (truncated upload)")


async def inflated_upload(request: Request, max_bytes: int) -> UploadSpool:
    """A ``Content-Encoding: gzip`` upload, received and inflated whole into a spool before anything is answered,
    so that a body whose inflated size passes ``max_bytes`` is refused with 413 (not cut off mid-stream), having
    written at most ``max_bytes``. Inflating runs in a worker thread: the event loop never does the heavy part."""
    spool = UploadSpool(max_bytes)
    inflater = GzipInflater(spool)
    try:
        async for chunk in request.stream():
            if chunk:
                await anyio.to_thread.run_sync(inflater.feed, chunk)
        inflater.finish()
    except BaseException:
        spool.close()
        raise
    spool.done = True  # the pump then only waits for the client to leave
    return spool


async def upload_spool(request: Request, max_bytes: int) -> UploadSpool | None:
    """The spool a /filter upload is read from, by its Content-Encoding: identity is spooled while it is scored;
    gzip is inflated whole first (``inflated_upload``); any other encoding is refused (415). ``None``: the client
    left during a gzip upload."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return UploadSpool(max_bytes)
    if encoding not in ("gzip", "x-gzip"):
        raise UnsupportedEncoding(f"content-encoding: {encoding!r} is not supported; send gzip or identity")
    try:
        return await inflated_upload(request, max_bytes)
    except ClientDisconnect:
        return None


class UploadStreamingResponse(StreamingResponse):
    """Streams records while the upload is still arriving; a disconnect cancels the work it caused.

    (Starlette's StreamingResponse would race the body reader for ``receive()``.)
    """

    def __init__(self, content: AsyncIterator[bytes], spool: UploadSpool, media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self.spool = spool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                def gone() -> None:
                    log.info("client disconnected mid-stream; its remaining work is cancelled")
                    group.cancel_scope.cancel()

                group.start_soon(self.spool.pump, receive, gone)
                await self.stream_response(send)
                group.cancel_scope.cancel()
        finally:
            self.spool.close()


def _ref(snapshot: ActiveSubspace, threshold: float | None) -> SubspaceRef:
    m = snapshot.manifest
    kinds = sorted({"text", "pair", *m.thresholds})
    return SubspaceRef(name=m.name, version=m.version, threshold=m.threshold if threshold is None else threshold,
                       thresholds={k: m.threshold_for(k) if threshold is None else threshold for k in kinds})


@router.post("/score", response_model=ScoreResponse, summary="Score items: a score and a keep/drop verdict each")
async def score(body: ScoreRequest, service: ScoringService = Depends(get_service),
                caller: str = Depends(require_client)) -> ScoreResponse:
    limit = service.settings.max_items_per_request
    samples = [it.sample for it in body.items]
    items = [item for sample in samples for item in sample.items]  # a preference item is its two sides
    if len(items) > limit:
        raise PayloadTooLarge(f"items: {len(items)} items exceed the limit of {limit} per request"
                              + (" (a preference item counts as its two sides)" if len(items) > len(samples) else ""))
    for i, sample in enumerate(samples):
        for item in sample.items:
            service.check_size(item, f"items[{i}]")
    service.check_rate(caller, len(items))
    snapshot = service.snapshot()
    results = merge_sides(samples, await service.score(items, snapshot, body.threshold, caller=caller))
    return ScoreResponse(
        results=[ItemResult(id=it.id, score=r.score, verdict=r.verdict, threshold=r.threshold, truncated=r.truncated,
                            n_tokens=r.n_tokens, probability=r.probability, sides=side_records(r) or None)
                 for it, r in zip(body.items, results, strict=True)],
        subspace=_ref(snapshot, body.threshold),
    )


async def _lines(chunks: AsyncIterator[bytes], max_line_bytes: int, shape: Shape | Literal["auto"] = "auto",
                 columns: Mapping[str, str] | None = None, start_line: int = 1) -> AsyncIterator[Line | None]:
    """Numbered lines of the upload, read incrementally by the one splitter (``LineSplitter``); oversize lines become
    error lines. A line numbered below ``start_line`` (a resumed stream) is ``None``: counted, not parsed."""
    splitter = LineSplitter(max_line_bytes)

    def line(record: Record) -> Line | None:
        if record.number < start_line:
            return None
        if record.payload is None:
            return Line(record.number, None, None, None, record.error)
        return parse_line(record.number, record.payload, shape, columns)

    async for chunk in chunks:
        for record in splitter.feed(chunk):
            yield line(record)
    for record in splitter.finish():
        yield line(record)


def _size_checked(line: Line, service: ScoringService) -> Line:
    """The line, or an error line where one of its items is above the service's size limit."""
    try:
        for item in line.items:
            service.check_size(item, "item")
    except ItemTooLarge as err:
        return replace(line, item=None, sides=(), error=str(err))
    return line


@router.post(
    "/filter",
    summary="Filter a JSONL/NDJSON stream; one record per input line, then a summary",
    openapi_extra={"requestBody": {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}, "required": True}},
    response_class=StreamingResponse,
)
async def filter_stream(
    request: Request,
    emit: Literal["all", "kept", "dropped"] = Query("all", description="Which scored lines to emit; errors and the summary always are."),
    threshold: float | None = Query(None, allow_inf_nan=False, description="Override τ for this request."),
    shape: Literal["auto", Shape] = Query("auto", alias="format", description="The lines' shape; auto detects it line by line from the keys."),
    columns: str | None = Query(None, description="Key mapping, canonical=yours, comma-separated: prompt=question,response=answer"),
    start_line: int = Query(1, ge=1, description="Resume an interrupted stream: send the same upload again with the last line "
                            "received + 1; the lines before it are counted (summary: skipped), not scored, not emitted again."),
    service: ScoringService = Depends(get_service),
    caller: str = Depends(require_client),
) -> Response:
    settings = service.settings
    service.check_rate(caller)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"body: {declared} bytes exceed the upload limit of {settings.max_upload_bytes} bytes")
    mapping = parse_columns(columns) if columns else None
    snapshot = service.snapshot()  # one version for the whole stream
    max_line_bytes = settings.max_chars_per_item * 4 + 4096
    spool = await upload_spool(request, settings.max_upload_bytes)
    if spool is None:
        return Response(status_code=499)  # the client left before its gzip upload was in: nobody to answer

    async def records() -> AsyncIterator[bytes]:
        counts = {"total": 0, "kept": 0, "dropped": 0, "rejected": 0, "skipped": 0}
        shapes: Counter[str] = Counter()
        pending: list[Line] = []

        async def flush() -> AsyncIterator[bytes]:
            checked = [_size_checked(line, service) for line in pending]
            valid, items = scorable(checked)
            # A stream cannot answer 429 halfway: it stands in line for capacity, ahead of later callers.
            item_results = await service.score(items, snapshot, threshold, wait=True, caller=caller) if items else []
            for line, s in merge_back(checked, valid, item_results):
                counts["total"] += 1
                if line.shape is not None:
                    shapes[line.shape] += 1
                if s is None:
                    counts["rejected"] += 1
                    metrics.REJECTED_LINES.inc()
                    yield orjson.dumps(line_record(line, None)) + b"\n"
                    continue
                counts["kept" if s.verdict == "keep" else "dropped"] += 1
                if emit == "all" or (emit == "kept") == (s.verdict == "keep"):
                    # the one record shape (``line_record``, as ``saft score`` writes it), with the line's object
                    yield orjson.dumps({"id": None, **line_record(line, s), "item": line.obj}) + b"\n"
            pending.clear()

        aborted = None
        try:
            async for line in _lines(spool.chunks(), max_line_bytes, shape, mapping, start_line):
                if line is None:  # before start_line: the client has its record from the stream it resumes
                    counts["total"] += 1
                    counts["skipped"] += 1
                    continue
                pending.append(line)
                if len(pending) >= settings.filter_chunk_lines:
                    async for out in flush():
                        yield out
        except (PayloadTooLarge, BodyTimeout) as err:
            aborted = str(err)
        async for out in flush():
            yield out
        if aborted is not None:  # the status line is already sent: say it in the stream
            yield orjson.dumps({"line": None, "error": f"{aborted}; the rest of the upload was not read"}) + b"\n"
        summary = FilterSummary(**counts, subspace=_ref(snapshot, threshold), complete=aborted is None, shapes=dict(shapes),
                                start_line=start_line)
        resumed = start_line > 1  # a stream that does not resume reads as it always has
        yield orjson.dumps(summary.model_dump(exclude=None if resumed else {"start_line", "skipped"})) + b"\n"

    return UploadStreamingResponse(records(), spool, media_type="application/x-ndjson")
