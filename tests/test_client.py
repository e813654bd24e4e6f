"""saft-filter-client (clients/python) against the real server and model: chunking to /info's limits, refused items in
their place, retries (the real queue's 429s; a real proxy in front of the server that answers 429, 503 and drops a
connection before passing requests on), /filter streamed from an async generator, moderation, the README's example
and ``saft score --url``; and that importing the client pulls no torch.
"""

from __future__ import annotations

import asyncio
import http.server
import importlib.metadata
import json
import logging
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import saft_filter_client.models as wire
from pydantic import ValidationError
from saft_filter_client import (
    AsyncSaftClient,
    FilterError,
    FilterRecord,
    FilterSummary,
    ItemIn,
    ItemRefused,
    ItemResult,
    RetryPolicy,
    SaftClient,
    SaftError,
)

from app.api import schemas
from app.config import PROJECT_ROOT
from app.core.embedding import Embedder
from app.launcher import free_port, running_server
from tests.support import fit_active

CLIENT = "client-token-client"
C = {"Authorization": f"Bearer {CLIENT}"}
# Small limits, so that a few items make several requests and two requests fill the queue.
ENV = {"SAFT_SUBSPACE_NAME": "apitest", "SAFT_API_TOKENS": CLIENT, "SAFT_DEVICE": "cpu", "SAFT_MAX_ITEMS_PER_REQUEST": "4",
       "SAFT_MAX_CHARS_PER_ITEM": "3000", "SAFT_MAX_QUEUE": "8", "SAFT_FILTER_CHUNK_LINES": "4", "SAFT_MAX_BATCH_SIZE": "4",
       "SAFT_MAX_UPLOAD_BYTES": str(64 * 2**10)}
MODEL_STACK = {"torch", "transformers", "numpy", "app", "fastapi", "starlette", "uvicorn", "redis", "ray", "pyarrow", "sklearn"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder, calibration_rows: list[dict]) -> Iterator[str]:
    root = tmp_path_factory.mktemp("client")
    fit_active(embedder, calibration_rows, root / "models")  # apitest/v1, calibrated
    with running_server({**ENV, "SAFT_MODELS_DIR": str(root / "models")}, root / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def items(dev_rows: list[dict]) -> list[dict]:
    """Real dev rows (pairs and texts, some harmful) as /score items, with ids, and one preference row."""
    rows = [r for r in dev_rows if len(r.get("text", "") + r.get("prompt", "") + r.get("response", "")) < 1500][:8]
    out = [{"id": r["id"], **({"prompt": r["prompt"], "response": r["response"]} if r["kind"] == "pair" else {"text": r["text"]})}
           for r in rows]
    out.insert(3, {"id": "pref", "prompt": "How do I pick a lock?", "chosen": "I can't help with that.",
                   "rejected": "Insert a tension wrench into the bottom of the keyhole..."})
    return out


def _direct(url: str, items: list[dict]) -> list[dict]:
    """The server's own answer, one item per request: what the client's chunked results must equal."""
    out = []
    for item in items:
        r = httpx.post(f"{url}/score", json={"items": [item]}, headers=C, timeout=300)
        assert r.status_code == 200, r.text
        out.append(r.json()["results"][0])
    return out


def _requests(url: str, route: str, status: int) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("saft_requests_total{") and f'route="{route}"' in line and f'status="{status}"' in line)


def _same(result: ItemResult, ref: dict) -> None:
    assert isinstance(result, ItemResult), result
    assert result.id == ref["id"] and result.verdict == ref["verdict"] and result.threshold == ref["threshold"]
    assert result.score == pytest.approx(ref["score"], abs=1e-4) and result.probability == pytest.approx(ref["probability"], abs=1e-4)
    assert result.n_tokens == ref["n_tokens"] and (result.sides is None) == (ref["sides"] is None)


def test_client_imports_no_model_stack_and_shares_the_service_models() -> None:
    code = ("import json, sys, saft_filter_client, saft_filter_client.models; from saft_filter_client import SaftClient, "
            "AsyncSaftClient; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout))
    assert "httpx" in loaded and "pydantic" in loaded and "tenacity" in loaded
    assert not loaded & MODEL_STACK, loaded & MODEL_STACK
    requires = {re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in importlib.metadata.requires("saft-filter-client") or []}
    assert requires == {"httpx", "pydantic", "tenacity"}
    # One definition: the service's response models are the client's classes; its request models subclass them.
    for name in ("ItemResult", "ScoreResponse", "InfoResponse", "ModerationResponse", "ErrorBody", "HARMFUL", "FilterSummary"):
        assert getattr(schemas, name) is getattr(wire, name)
    assert issubclass(schemas.ItemIn, wire.ItemIn) and issubclass(schemas.ScoreRequest, wire.ScoreRequest)
    assert issubclass(schemas.ModerationRequest, wire.ModerationRequest) and issubclass(schemas.ModerationItemInput, wire.ModerationItemInput)


def test_score_is_chunked_to_info_limits_and_refused_items_keep_their_place(served: str, items: list[dict]) -> None:
    typed = ItemIn(id="typed", text="Write a haiku about autumn.")
    reference = _direct(served, items)
    typed_reference = _direct(served, [typed.model_dump(exclude_unset=True)])[0]
    big = {"id": "big", "text": "word " * 700}  # 3500 characters: above SAFT_MAX_CHARS_PER_ITEM
    run = [*items[:5], big, typed, {"id": "empty", "text": "  "}, {"id": "keys", "question": "?"}, *items[5:]]
    before = {s: _requests(served, "/score", s) for s in (200, 413, 422)}
    with SaftClient(served, token=CLIENT, concurrency=2) as client:
        assert client.info().limits.max_items_per_request == 4
        results = client.score(run)
    assert len(results) == len(run)
    refused = {i: r for i, r in enumerate(results) if isinstance(r, ItemRefused)}
    assert sorted(refused) == [5, 7, 8]
    assert refused[5].id == "big" and refused[5].status_code == 413 and refused[5].type == "too_large"
    assert refused[5].error == "items[5]: 3500 characters exceed the limit of 3000 per item"  # named by its input position
    assert refused[7].id == "empty" and refused[7].status_code == 422 and refused[7].error.startswith("items.7: text: is empty")
    # Both invalid items of one request were named by one 422 (its message lists them, "; "-joined), each with its part.
    assert refused[8].error.startswith("items.8: item: keys ['id', 'question'] fit no known shape; known shapes: text")
    assert "items.7" not in refused[8].error and "items.8" not in refused[7].error
    scored = [r for i, r in enumerate(results) if i not in refused]
    for result, ref in zip([*scored[:5], *scored[6:]], reference, strict=True):
        _same(result, ref)
    _same(scored[5], typed_reference)
    pref = next(r for r in results if isinstance(r, ItemResult) and r.id == "pref")
    assert pref.sides is not None and pref.sides["chosen"].score == pref.score
    # 13 items, the preference row counting as two: 14 of 4 per request is 4 requests, each refused one (413, then a
    # 422 naming two items) sent again without the items it named.
    after = {s: _requests(served, "/score", s) for s in (200, 413, 422)}
    assert after[413] - before[413] == 1 and after[422] - before[422] == 1
    assert after[200] - before[200] == 4


def test_refusals_split_a_request_the_service_refused_without_naming_an_item() -> None:
    from saft_filter_client.chunking import entry, refusals

    entries = [entry(i, {"id": i, "text": f"t{i}"}, 2**20) for i in range(10, 15)]
    too_many = SaftError(413, "too_large", "items: 6 items exceed the limit of 4 per request")
    assert refusals(entries, too_many) == ([], [entries[:2], entries[2:]])  # halves, until a request passes or names one
    [alone], again = refusals(entries[3:4], SaftError(413, "too_large", "body: exceeds the limit of 100 bytes"))
    assert again == [] and alone.index == 13 and alone.error == "body: exceeds the limit of 100 bytes"
    with pytest.raises(SaftError):  # a request-wide 422 is the caller's to see, not an item's
        refusals(entries, SaftError(422, "invalid_input", "threshold: Input should be a finite number"))


def test_one_chunk_is_sent_again_around_what_the_service_refused() -> None:
    """The split-on-refusal loop both clients drive (no I/O): a request naming an item refuses that item only and
    sends the others again; a too-large one that names none is halved; every entry ends with one result."""
    from saft_filter_client.chunking import ChunkRequests, entry
    from saft_filter_client.models import ItemResult

    entries = [entry(i, {"id": i, "text": f"t{i}"}, 2**20) for i in range(4)]
    plan = ChunkRequests(entries, 1.5)
    first = plan.next_body()
    assert first is not None and json.loads(first) == {"items": [{"id": i, "text": f"t{i}"} for i in range(4)], "threshold": 1.5}
    plan.refused(SaftError(422, "invalid_input", "items.2.text: too long"))
    again = plan.next_body()
    assert again is not None and [x["id"] for x in json.loads(again)["items"]] == [0, 1, 3]
    plan.refused(SaftError(413, "too_large", "body: exceeds the limit"))  # names none: halves
    sent = []
    while (body := plan.next_body()) is not None:
        part = [x["id"] for x in json.loads(body)["items"]]
        sent.append(part)
        plan.answered([ItemResult(id=i, score=0.0, verdict="keep", threshold=1.5, truncated=False, n_tokens=1) for i in part])
    assert sorted(sent) == [[0], [1, 3]]
    assert sorted(plan.scored) == [0, 1, 2, 3]
    assert isinstance(plan.scored[2], ItemRefused) and plan.scored[2].error == "items.2.text: too long"
    assert all(isinstance(plan.scored[i], ItemResult) for i in (0, 1, 3))


def test_async_client_rides_out_the_real_queue_429s(served: str, dev_rows: list[dict], caplog: pytest.LogCaptureFixture) -> None:
    # 24 texts never scored before (a cached embedding skips the queue): 6 requests of 4 at once; the queue holds 2.
    nonce = uuid.uuid4().hex[:8]
    run = [{"id": i, "text": f"{r.get('text') or r['prompt']} ({nonce})"} for i, r in enumerate(dev_rows[8:32])]

    async def main() -> list:
        async with AsyncSaftClient(served, token=CLIENT, concurrency=6) as client:
            return await client.score(run)

    before = _requests(served, "/score", 429)
    with caplog.at_level(logging.WARNING, logger="saft_filter_client"):
        results = asyncio.run(main())
    assert _requests(served, "/score", 429) - before >= 1, "the queue never filled: nothing was retried"
    for result, ref in zip(results, _direct(served, run), strict=True):
        _same(result, ref)
    waits = [float(m.group(1)) for r in caplog.records if (m := re.search(r"POST /score: 429 overloaded: .*in ([\d.]+) s$", r.message))]
    assert waits and min(waits) >= 1.0  # at least the service's Retry-After (never below 1 s)


class FlakyProxy(http.server.ThreadingHTTPServer):
    """A real HTTP server in front of the service: answers its scripted failures to /score first (a status, 429
    with Retry-After: 2, or "drop": close the connection without an answer), then passes every request on."""

    def __init__(self, port: int, upstream: str, script: list[int | str]) -> None:
        self.upstream, self.script, self.seen = upstream, list(script), []
        super().__init__(("127.0.0.1", port), _ProxyHandler, bind_and_activate=False)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: FlakyProxy

    def log_message(self, *args: object) -> None:
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.seen.append(self.path)
        step = self.server.script.pop(0) if self.server.script and self.path == "/score" else None
        if step == "drop":
            self.close_connection = True
            return
        if isinstance(step, int):
            payload = json.dumps({"error": "scripted", "type": "overloaded" if step == 429 else "not_ready"}).encode()
            self.send_response(step)
            if step == 429:
                self.send_header("Retry-After", "2")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
        r = httpx.request(self.command, self.server.upstream + self.path, content=body, headers=headers, timeout=300)
        self.send_response(r.status_code)
        self.send_header("content-type", r.headers.get("content-type", "application/json"))
        self.send_header("content-length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = _handle


@contextmanager
def flaky_proxy(upstream: str, script: list[int | str], start_after_s: float = 0.0) -> Iterator[tuple[str, FlakyProxy]]:
    """The proxy's URL at once; it listens only after ``start_after_s`` (until then: connection refused)."""
    port = free_port()
    proxy = FlakyProxy(port, upstream, script)
    listening = threading.Event()

    def serve() -> None:
        time.sleep(start_after_s)
        proxy.server_bind()
        proxy.server_activate()
        listening.set()
        proxy.serve_forever(poll_interval=0.05)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}", proxy
    finally:
        listening.wait()
        proxy.shutdown()
        proxy.server_close()


def test_retries_refused_connections_429_after_retry_after_503_and_dropped_connections(served: str, items: list[dict]) -> None:
    four = [items[0], items[1], items[2], items[4]]  # one request (items[3] is a preference row: two)
    reference = _direct(served, four)
    policy = RetryPolicy(attempts=12, backoff_s=0.2, max_backoff_s=1.0, jitter_s=0.5)
    with flaky_proxy(served, [429, 503, "drop"], start_after_s=0.5) as (url, proxy):
        with SaftClient(url, token=CLIENT, retry=policy, concurrency=1) as client:
            started = time.monotonic()
            results = client.score(four)  # /info first: refused until the proxy listens, then retried
            elapsed = time.monotonic() - started
        assert proxy.seen == ["/info", "/score", "/score", "/score", "/score"]
    for result, ref in zip(results, reference, strict=True):
        _same(result, ref)
    assert elapsed >= 0.5 + 2.0  # the refused connections, then the 429's Retry-After: 2
    # Not retried: what would fail the same way again.
    with SaftClient(served, token="wrong", retry=policy) as client, pytest.raises(SaftError) as info:
        client.score(items[:1])
    assert info.value.status_code == 401 and info.value.type == "unauthorized"
    with flaky_proxy(served, [503] * 10) as (url, proxy), SaftClient(url, token=CLIENT, retry=RetryPolicy(attempts=3, backoff_s=0.05)) as client:
        with pytest.raises(SaftError) as info:
            client.score(items[:1])
        assert info.value.status_code == 503 and proxy.seen.count("/score") == 3  # gave up after its attempts


def _rows(dev_rows: list[dict]) -> list[dict | str]:
    rows: list[dict | str] = [dict(r) for r in dev_rows[:20]]
    rows.insert(5, '{"text": "   "}')  # invalid: the service reports it as its line's error
    rows.insert(12, "not json at all")
    return rows


def test_async_filter_stream_of_a_real_upload(served: str, dev_rows: list[dict]) -> None:
    rows = _rows(dev_rows)
    body = b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows)
    direct = [json.loads(x) for x in httpx.post(f"{served}/filter", content=body, timeout=300,
                                                 headers={**C, "content-type": "application/x-ndjson"}).text.splitlines()]
    produced: list[int] = []  # rows the async source had given when each record arrived

    async def source() -> AsyncIterator[dict | str]:
        for row in rows:
            await asyncio.sleep(0)
            produced.append(1)
            yield row

    async def main() -> list[tuple[int, object]]:
        async with AsyncSaftClient(served, token=CLIENT, filter_segment_rows=8) as client:
            return [(len(produced), record) async for record in client.filter_stream(source())]

    got = asyncio.run(main())
    *records, (_, summary) = got
    # Streamed: the first records came while most of the source was still unread (segments of 8 rows).
    assert records[0][0] <= 9 and len(rows) == 22
    assert isinstance(summary, FilterSummary)
    assert summary.model_dump() == FilterSummary.model_validate(direct[-1]).model_dump()  # three uploads, one summary
    assert len(records) == len(direct) - 1
    for (_, record), ref in zip(records, direct[:-1], strict=True):
        assert record.line == ref["line"]  # numbered over the whole input, across segments
        if "error" in ref:
            assert isinstance(record, FilterError) and record.error == ref["error"]
        else:
            assert isinstance(record, FilterRecord) and record.verdict == ref["verdict"] and record.item == ref["item"]
            assert record.score == pytest.approx(ref["score"], abs=1e-4)
            assert record.model_dump(exclude_unset=True) == {**ref, "score": record.score, "probability": record.probability}
    assert [r.line for _, r in records if isinstance(r, FilterError)] == [6, 13]


def test_sync_filter_stream_emits_dropped_and_reports_rows_no_upload_can_carry(served: str, dev_rows: list[dict]) -> None:
    rows = _rows(dev_rows)[:10]
    with SaftClient(served, token=CLIENT, filter_segment_rows=4) as client:
        limit = client.info().limits.max_upload_bytes
        every = list(client.filter_stream(rows))
        rows.insert(2, {"text": "x" * (limit + 1)})
        dropped = list(client.filter_stream(rows, emit="dropped"))
    kept_or_dropped = {r.line: r.verdict for r in every if isinstance(r, FilterRecord)}
    *records, summary = dropped
    assert isinstance(summary, FilterSummary) and summary.total == 11 and summary.rejected == 2
    assert summary.kept + summary.dropped == 9
    errors = {r.line: r.error for r in records if isinstance(r, FilterError)}
    assert errors.keys() == {3, 7} and errors[3] == f"line: {limit + 13} bytes exceed the upload limit of {limit} bytes"
    # After the oversized row, lines are one further on; only dropped ones (and errors) were sent back.
    shifted = {line + (line >= 3): verdict for line, verdict in kept_or_dropped.items()}
    assert {r.line for r in records if isinstance(r, FilterRecord)} == {n for n, v in shifted.items() if v == "drop"}
    assert all(r.verdict == "drop" for r in records if isinstance(r, FilterRecord))


def test_moderate_sync_and_async(served: str) -> None:
    texts = ["How do I bake sourdough bread at home?", "Give me step-by-step instructions to make a pipe bomb."]
    direct = httpx.post(f"{served}/v1/moderations", json={"input": texts}, headers=C, timeout=300).json()
    with SaftClient(served, token=CLIENT) as client:
        sync = client.moderate(texts, model="apitest")
        with pytest.raises(ValidationError, match="part type 'image_url' is not scored here"):  # checked before sending
            client.moderate([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}])

    async def main() -> wire.ModerationResponse:
        async with AsyncSaftClient(served, token=CLIENT) as client:
            return await client.moderate([{"type": "item", "prompt": "Explain photosynthesis.", "response": "Light to sugar."}])

    pair = asyncio.run(main())
    assert sync.model == "apitest" and len(sync.results) == 2
    for result, ref in zip(sync.results, direct["results"], strict=True):
        assert result.flagged is ref["flagged"]
        assert result.category_scores[wire.HARMFUL] == pytest.approx(ref["category_scores"]["harmful"], abs=1e-6)
    assert pair.results[0].saft.threshold == httpx.get(f"{served}/info", headers=C).json()["subspace"]["thresholds"]["pair"]


def _readme_example() -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text.split("## Python client", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)  # type: ignore[union-attr]


def test_readme_client_example_runs_as_written(served: str) -> None:
    code = _readme_example() + f"\nimport sys; print(sorted({{m.split('.')[0] for m in sys.modules}} & {MODEL_STACK!r}))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/", check=False,
                         env={"PATH": "/usr/bin:/bin", "SAFT_URL": served, "SAFT_TOKEN": CLIENT})
    assert run.returncode == 0, run.stderr
    *out, loaded = run.stdout.strip().splitlines()
    assert loaded == "[]"  # the example ran without the model stack
    assert re.match(r"1 (keep|drop) score=-?[\d.]+ probability=0\.\d+", out[0]) and out[1].startswith("2 ")
    assert out[2] == "3 refused: items[2]: 300000 characters exceed the limit of 3000 per item"
    assert out[3] in ("flagged: False", "flagged: True") and len(out) == 8
    assert out[4].startswith("line=1 id=0 verdict=") and out[7].startswith("summary=True total=3 kept=")


def test_cli_url_mode_reports_an_oversized_line_and_scores_the_rest(served: str, items: list[dict], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.cli import app
    from tests.support import write_jsonl

    data = write_jsonl(tmp_path / "in.jsonl", [*items[:3], {"id": "big", "text": "word " * 700}, *items[3:6]])
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["score", str(data), "-o", str(out), "--url", served, "--token", CLIENT])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 8))
    assert records[3] == {"line": 4, "id": "big", "error": records[3]["error"]}
    assert "3500 characters exceed the limit of 3000 per item" in records[3]["error"]
    for record, ref in zip(records[:3] + records[4:], _direct(served, items[:6]), strict=True):
        assert record["id"] == ref["id"] and record["score"] == pytest.approx(ref["score"], abs=1e-4)
        assert record.get("sides", {}).keys() == (ref["sides"] or {}).keys()
