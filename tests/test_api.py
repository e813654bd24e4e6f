"""The HTTP service end to end: real uvicorn on loopback, the real default model, real data."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.core.embedding import Embedder
from app.core.items import parse_item
from app.core.pipeline import score_encoded
from app.launcher import running_server
from app.store.registry import ActiveSubspace
from tests.support import fit_active, metric_value, wait_for, wait_job

CLIENT, ADMIN = "client-token-1", "admin-token-1"
C = {"Authorization": f"Bearer {CLIENT}"}
A = {"Authorization": f"Bearer {ADMIN}"}
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder, calibration_rows: list[dict]):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("api")
    snapshot = fit_active(embedder, calibration_rows, root / "models")
    env = {"SAFT_MODELS_DIR": str(root / "models"), "SAFT_SUBSPACE_NAME": "apitest", "SAFT_API_TOKENS": CLIENT,
           "SAFT_ADMIN_TOKEN": ADMIN, "SAFT_MAX_ITEMS_PER_REQUEST": "64", "SAFT_MAX_CHARS_PER_ITEM": "20000",
           "SAFT_MAX_BODY_BYTES": str(2 * 2**20), "SAFT_FILTER_CHUNK_LINES": "8"}
    with running_server(env, root / "server.log") as url:
        yield url, snapshot, root


def _expected(embedder: Embedder, snapshot: ActiveSubspace, objs: list[dict]) -> np.ndarray:
    items = [parse_item(o) for o in objs]
    encoded = embedder.encode_items(items, snapshot.manifest.embedding)
    vectors = np.stack([embedder.forward([e], snapshot.manifest.embedding)[0] for e in encoded])  # each alone
    return np.array([r.score for r in score_encoded(snapshot.subspace, snapshot.manifest, items, encoded, vectors)])


def test_health_ready_metrics_openapi(served) -> None:
    url, _, _ = served
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["status"] == "ready" and ready["subspace"] == {"name": "apitest", "version": "v1"}
    schema = httpx.get(f"{url}/openapi.json").json()
    for path in ("/score", "/filter", "/subspace/refit", "/subspace/versions/{version}/activate", "/readyz"):
        assert path in schema["paths"]
    assert schema["components"]["schemas"]["ItemIn"]["examples"]
    httpx.post(f"{url}/score", json={"items": [{"text": "warm"}]}, headers=C)
    text = httpx.get(f"{url}/metrics").text
    for name in ("saft_requests_total", "saft_request_seconds", "saft_queue_depth", "saft_batch_size", "saft_batch_tokens",
                 "saft_inference_seconds", "saft_items_scored_total", "saft_verdicts_total", "saft_truncations_total",
                 'saft_active_subspace_version{name="apitest"} 1.0', "saft_batch_padding_ratio", "saft_padding_tokens_total"):
        assert name in text
    assert 'route="/score"' in text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
    # Every forward pass observes its padding share; real tokens were run (the warm-up's and this request's).
    assert values["saft_batch_padding_ratio_count"] == values["saft_batch_size_count"] > 0
    assert values["saft_real_tokens_total"] > 0 and 0 <= values["saft_padding_tokens_total"]


def test_score_matches_core_and_names_version(served, embedder: Embedder, dev_rows: list[dict]) -> None:
    url, snapshot, _ = served
    objs = [{"text": "How do I bake sourdough bread at home?"},
            {"prompt": "Explain photosynthesis.", "response": "Plants turn light, water and CO2 into sugar."},
            {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}]},
            *({k: r[k] for k in ("prompt", "response") if k in r} if r["kind"] == "pair" else {"text": r["text"]} for r in dev_rows[:9])]
    body = {"items": [{**o, "id": i} for i, o in enumerate(objs)]}
    response = httpx.post(f"{url}/score", json=body, headers=C, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    m = snapshot.manifest
    # The fit chose a τ per item kind (max_f1 on each kind's calibration items); both are reported.
    assert set(m.thresholds) == {"text", "pair"} and m.thresholds["text"] != m.thresholds["pair"]
    assert data["subspace"] == {"name": "apitest", "version": "v1", "threshold": m.threshold, "thresholds": m.thresholds}
    got = np.array([r["score"] for r in data["results"]])
    assert [r["id"] for r in data["results"]] == list(range(len(objs)))
    # Scored inside a mixed-length server batch, equal to each item embedded alone in-process.
    assert np.abs(got - _expected(embedder, snapshot, objs)).max() <= 1e-4 * np.abs(got).max()
    for obj, r in zip(objs, data["results"], strict=True):
        tau = m.thresholds[parse_item(obj).kind]  # each item is decided by its own kind's τ, and says which
        assert r["threshold"] == tau and r["verdict"] == ("drop" if r["score"] > tau else "keep")
        assert r["n_tokens"] > 0 and isinstance(r["truncated"], bool)
    low = httpx.post(f"{url}/score", json={**body, "threshold": -1e30}, headers=C, timeout=120).json()
    assert {r["verdict"] for r in low["results"]} == {"drop"} and low["subspace"]["threshold"] == -1e30
    assert {r["threshold"] for r in low["results"]} == {-1e30} and set(low["subspace"]["thresholds"].values()) == {-1e30}


def test_concurrent_clients_get_batch_independent_scores(served, embedder: Embedder, dev_rows: list[dict]) -> None:
    url, snapshot, _ = served
    texts = [r["text"] if r["kind"] == "prompt" else r["prompt"] for r in dev_rows[:16]]
    expected = _expected(embedder, snapshot, [{"text": t} for t in texts])

    async def main() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=url, headers=C, timeout=300) as client:
            async def one(i: int) -> list[float]:
                # Each client sends a different rotation, so every text meets different batch-mates.
                order = texts[i:] + texts[:i]
                r = await client.post("/score", json={"items": [{"text": t} for t in order]})
                assert r.status_code == 200, r.text
                scores = [x["score"] for x in r.json()["results"]]
                return scores[-i:] + scores[:-i] if i else scores
            return await asyncio.gather(*(one(i) for i in range(12)))

    for scores in asyncio.run(main()):
        assert np.abs(np.array(scores) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_limits_and_validation(served) -> None:
    url, _, _ = served
    r = httpx.post(f"{url}/score", json={"items": [{"text": "x"}] * 65}, headers=C)
    assert r.status_code == 413 and "65 items exceed the limit of 64" in r.json()["error"]
    r = httpx.post(f"{url}/score", json={"items": [{"text": "a" * 20001}]}, headers=C)
    assert r.status_code == 413 and "items[0]: 20001 characters exceed the limit of 20000" in r.json()["error"]
    r = httpx.post(f"{url}/score", content=b'{"items": [{"text": "' + b"a" * (3 * 2**20) + b'"}]}', headers={**C, "content-type": "application/json"})
    assert r.status_code == 413 and "limit of 2097152 bytes" in r.json()["error"]
    r = httpx.post(f"{url}/score", json={"items": [{"text": "ok"}, {"text": "  "}]}, headers=C)
    assert r.status_code == 422 and "items.1" in r.json()["error"] and "text: is empty" in r.json()["error"]
    r = httpx.post(f"{url}/score", json={"items": [{"prompt": "p"}, {"id": 3}]}, headers=C)
    assert r.status_code == 422 and "items.1: item: keys ['id'] fit no known shape; known shapes: text {text}" in r.json()["error"]
    r = httpx.post(f"{url}/score", json={"items": []}, headers=C)
    assert r.status_code == 422 and "items" in r.json()["error"]
    r = httpx.post(f"{url}/score", content=b"{not json", headers={**C, "content-type": "application/json"})
    assert r.status_code == 422
    r = httpx.post(f"{url}/score", json={"items": [{"text": 5}]}, headers=C)
    assert r.status_code == 422 and "items.0.text" in r.json()["error"]


def test_auth(served) -> None:
    url, _, _ = served
    body = {"items": [{"text": "hi"}]}
    assert httpx.post(f"{url}/score", json=body).status_code == 401
    r = httpx.post(f"{url}/score", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{url}/score", json=body, headers=A).status_code == 200
    for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 401), (C, 403)):
        assert httpx.post(f"{url}/subspace/versions/v1/activate", headers=headers).status_code == status
        assert httpx.post(f"{url}/subspace/refit", content=b'{"text": "x"}', headers=headers).status_code == status
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no token


def test_filter_stream_accounts_for_every_line(served, dev_rows: list[dict]) -> None:
    url, _snapshot, _ = served
    good = [json.dumps(r) for r in dev_rows[:20]]
    lines = good[:5] + ["{broken", json.dumps({"text": ""}), "", json.dumps({"text": "a" * 20001})] + good[5:]
    payload = "\n".join(lines).encode() + b"\n\xff\xfe not utf-8"  # line 25, no trailing newline
    with httpx.stream("POST", f"{url}/filter", content=payload, headers={**C, "content-type": "application/x-ndjson"}, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        records = [json.loads(x) for x in r.iter_lines() if x]
    summary = records[-1]
    assert summary["summary"] is True and summary["complete"] is True
    assert summary["subspace"]["version"] == "v1"
    assert summary["total"] == 24 and summary["rejected"] == 4 and summary["kept"] + summary["dropped"] == 20
    errors = {r["line"]: r["error"] for r in records[:-1] if "error" in r}
    assert set(errors) == {6, 7, 9, 25}  # line 8 is blank: numbered, nothing to account for
    assert errors[6].startswith("invalid JSON") and errors[7].startswith("text: is empty")
    assert "20001 characters exceed the limit" in errors[9]
    scored = [r for r in records[:-1] if "verdict" in r]
    assert [r["id"] for r in scored] == [r["id"] for r in dev_rows[:20]]
    assert all(r["item"]["id"] == r["id"] for r in scored)
    kept_only = httpx.post(f"{url}/filter?emit=kept", content=payload, headers=C, timeout=300).text.splitlines()
    kept_records = [json.loads(x) for x in kept_only if x]
    assert {r.get("verdict") for r in kept_records[:-1] if "verdict" in r} <= {"keep"}
    assert len([r for r in kept_records if r.get("verdict") == "keep"]) == summary["kept"]
    assert len([r for r in kept_records if "error" in r]) == 4


def _filter_records(url: str, payload: bytes, query: str = "") -> list[dict]:
    with httpx.stream("POST", f"{url}/filter{query}", content=payload, headers={**C, "content-type": "application/x-ndjson"},
                      timeout=300) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(x) for x in r.iter_lines() if x]


def _exact(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("score", "probability")}


def _tally(records: list[dict]) -> dict[str, int]:
    buckets = [{"keep": "kept", "drop": "dropped"}.get(rec.get("verdict", ""), "rejected") for rec in records]
    return {b: buckets.count(b) for b in ("kept", "dropped", "rejected")}


def test_an_interrupted_filter_resumes_after_the_last_line_received(served, dev_rows: list[dict]) -> None:
    """The connection is cut mid-stream; the same upload sent again with start_line = last line received + 1 gives
    the rest, and the two parts are exactly the uninterrupted stream's records: every line once, none twice."""
    url, _, _ = served
    rows = [{**r, "id": f"resume-{i}"} | ({"prompt": f"({i}) {r['prompt']}"} if r["kind"] == "pair" else {"text": f"({i}) {r['text']}"})
            for i, r in enumerate(dev_rows[:28])]  # texts no earlier test embedded: the first run is not served from cache
    lines = [json.dumps(r) for r in rows]
    lines[3:3] = ["{broken", ""]  # an invalid line early (in the part received), a blank one (numbered, not counted)
    lines[25:25] = [json.dumps({"text": ""})]  # an invalid line late (in the part resumed)
    payload = "\n".join(lines).encode() + b"\n"

    before = _items_scored(url)
    received: list[dict] = []
    with httpx.Client(timeout=300) as client, \
            client.stream("POST", f"{url}/filter", content=payload, headers={**C, "content-type": "application/x-ndjson"}) as r:
        for raw in r.iter_lines():  # whole lines only: a record cut in half is not received
            received.append(json.loads(raw))
            if len(received) == 10:  # past the first chunk of 8 lines, the rest still being scored
                break
    # leaving the block closed the connection mid-stream
    time.sleep(2)
    assert _items_scored(url) - before < len(rows), "the cut came after the server had scored everything"
    assert all("summary" not in rec for rec in received)
    last = received[-1]["line"]
    assert [rec["line"] for rec in received] == [1, 2, 3, 4, *range(6, 12)] and "error" in received[3]

    rest = _filter_records(url, payload, f"?start_line={last + 1}")
    resumed_summary, rest = rest[-1], rest[:-1]
    assert rest[0]["line"] == last + 1, "the first line after the last one received; nothing before it again"
    whole = _filter_records(url, payload)  # the uninterrupted stream, for reference
    summary, whole = whole[-1], whole[:-1]
    # Line numbers, ids, verdicts, items, errors, token counts: exactly the uninterrupted run's. Scores too, but for the
    # last bits of float64: the projection sums in a different order over chunks of other sizes (~1e-15 relative).
    assert [_exact(rec) for rec in received + rest] == [_exact(rec) for rec in whole]
    for mine, theirs in zip(received + rest, whole, strict=True):
        assert mine.keys() == theirs.keys()
        for key in ("score", "probability"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-12, abs=1e-12), (mine["line"], key)
    assert [rec["line"] for rec in whole] == [n for n, line in enumerate(lines, start=1) if line.strip()]

    # The resumed summary accounts for every line of the upload: the ones before start_line as skipped.
    assert "skipped" not in summary and "start_line" not in summary, "a stream that does not resume reads as before"
    assert resumed_summary["start_line"] == last + 1 and resumed_summary["skipped"] == len(received)
    assert resumed_summary["total"] == summary["total"] == len(rows) + 2
    counts = {k: resumed_summary[k] for k in ("kept", "dropped", "rejected")}
    assert counts == _tally(rest) and sum(counts.values()) + resumed_summary["skipped"] == summary["total"]
    assert {k: counts[k] + _tally(received)[k] for k in counts} == {k: summary[k] for k in counts} == _tally(whole)

    # Past the end: everything skipped, nothing scored; start_line must be a line number.
    beyond = _filter_records(url, payload, f"?start_line={len(lines) + 5}")
    assert len(beyond) == 1 and beyond[0]["skipped"] == beyond[0]["total"] == summary["total"] and beyond[0]["kept"] == 0
    refused = httpx.post(f"{url}/filter?start_line=0", content=payload, headers=C, timeout=60)
    assert refused.status_code == 422 and "start_line" in refused.json()["error"]


def test_refit_under_load_then_rollback(served, calibration_rows: list[dict], dev_rows: list[dict]) -> None:
    url, _, root = served
    upload = "\n".join(json.dumps(r) for r in calibration_rows).encode() + b"\n{broken\n"
    query = "layers=8&pooling=response&max_length=128&method=lda&center=kind&shrinkage=0.5&policy=fpr:0.1"

    async def main() -> tuple[list[str], dict]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            r = await client.post(f"/subspace/refit?{query}", content=upload, headers=A)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            busy = await client.post(f"/subspace/refit?{query}", content=upload, headers=A)
            assert busy.status_code == 409 and "already running" in busy.json()["error"]
            versions: list[str] = []
            job: dict = {}
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                batch = await asyncio.gather(*(client.post("/score", headers=C, json={"items": [{"text": r["text"][:500]} for r in dev_rows[i:i + 3]]})
                                               for i in range(4)))
                for resp in batch:
                    assert resp.status_code == 200, resp.text  # no failed request during the refit
                    versions.append(resp.json()["subspace"]["version"])
                job = (await client.get(f"/subspace/jobs/{job_id}", headers=C)).json()
                if job["status"] in ("succeeded", "failed"):
                    break
            return versions, job

    versions, job = asyncio.run(main())
    assert job["status"] == "succeeded", job
    assert job["version"] == "v2" and job["activated"] and job["quality"]["overall"]["auroc"] > 0.5
    assert job["progress"]["lines"] == len(calibration_rows)
    assert job["rejected"] == {"count": 1, "lines": [f"line {len(calibration_rows) + 1}: invalid JSON: " + job["rejected"]["lines"][0].split("invalid JSON: ")[1]]}
    assert set(versions) <= {"v1", "v2"}
    after = httpx.post(f"{url}/score", json={"items": [{"text": "hello"}]}, headers=C).json()
    assert after["subspace"]["version"] == "v2"
    listing = httpx.get(f"{url}/subspace/versions", headers=C).json()
    assert listing == {"name": "apitest", "active": "v2", "versions": ["v1", "v2"]}
    info = httpx.get(f"{url}/subspace", headers=C).json()
    assert info["manifest"]["threshold"]["policy"] == {"kind": "fpr", "value": 0.1}
    # the refit recorded its numeric path and probe items; clients see how many, not the calibration texts
    assert info["manifest"]["numeric_path"] == {"device": "cpu", "dtype": "float32", "attention": "sdpa", "compiled": False}
    stored = json.loads((root / "models" / "apitest" / "v2" / "manifest.json").read_text())["probes"]
    assert info["manifest"]["probes"] == {"count": len(stored)} and len(stored) >= 2
    r = httpx.post(f"{url}/subspace/versions/v1/activate", headers=A)
    assert r.status_code == 200 and r.json()["active"] is True
    assert httpx.post(f"{url}/score", json={"items": [{"text": "hello"}]}, headers=C).json()["subspace"]["version"] == "v1"
    assert (root / "models" / "apitest" / "ACTIVE").read_text().strip() == "v1"
    assert httpx.post(f"{url}/subspace/versions/v9/activate", headers=A).status_code == 404
    assert httpx.post(f"{url}/subspace/versions/..%2Fx/activate", headers=A).status_code in (404, 422)


def test_failed_refit_is_reported_and_publishes_nothing(served) -> None:
    url, _, root = served
    before = sorted(p.name for p in (root / "models" / "apitest").iterdir())
    r = httpx.post(f"{url}/subspace/refit?layers=8&max_length=64&strict=true", content=b'{"text": "fine"}\n{"text": ""}\n', headers=A)
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    for _ in range(300):
        job = httpx.get(f"{url}/subspace/jobs/{job_id}", headers=C).json()
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert job["status"] == "failed" and "calibration line 2: text: is empty" in job["error"]
    assert sorted(p.name for p in (root / "models" / "apitest").iterdir()) == before
    assert httpx.post(f"{url}/subspace/refit?layers=99", content=b'{"text": "x"}', headers=A).status_code == 422
    # The fit's parameters are one model (FitParams): a bad value or a misspelt name is a 422 naming it, before any job.
    bad = httpx.post(f"{url}/subspace/refit?pooling=max&shrinkge=0.1", content=b'{"text": "x"}', headers=A)
    assert bad.status_code == 422 and "query.pooling" in bad.json()["error"] and "query.shrinkge" in bad.json()["error"], bad.text
    assert httpx.get(f"{url}/subspace/jobs/nope", headers=C).status_code == 404


def _run_refit(url: str, query: str, rows: list[dict]) -> dict:
    upload = "\n".join(json.dumps(r) for r in rows).encode() + b"\n"
    r = httpx.post(f"{url}/subspace/refit?{query}", content=upload, headers=A)
    assert r.status_code == 202, r.text
    return wait_job(url, r.json()["job_id"], C)


def test_unlabeled_refit_anchors_on_the_active_version(served, dev_rows: list[dict]) -> None:
    """An unlabeled upload starts from the active version's stored statistics: its verdicts label the upload, τ is
    carried over, and the manifest names the strategy, the version it started from and both compared."""
    url, _, root = served
    before = httpx.get(f"{url}/subspace", headers=C).json()
    unlabeled = [{k: v for k, v in r.items() if k != "label"} for r in dev_rows]
    job = _run_refit(url, "layers=8&pooling=response&max_length=128", unlabeled)
    assert job["status"] == "succeeded", job
    refit = job["refit"]
    assert refit["strategy"] == "anchored" and refit["prior"]["version"] == before["version"]
    assert refit["upload"]["labelled"] == 0 and refit["upload"]["pseudo_labelled"] == len(dev_rows)
    assert refit["threshold_from"] == "carried from the prior"
    cmp = refit["comparison"]
    assert cmp["n"] == len(dev_rows) and 0.0 <= cmp["agreement"] <= 1.0
    # The job's decision is the guard's: activated exactly when no reason holds it back.
    assert job["activated"] == (not job["held"]), job
    manifest = json.loads((root / "models" / "apitest" / job["version"] / "manifest.json").read_text())
    assert manifest["refit"]["activation"]["requested"] == "auto"
    assert manifest["refit"]["prior"] == refit["prior"] and manifest["calibration"]["n_samples"] == len(dev_rows)
    # The new version stores statistics in turn (a later refit can start from it).
    from safetensors.numpy import load_file
    assert "statistics.shift" in load_file(str(root / "models" / "apitest" / job["version"] / "subspace.safetensors"))
    if not job["activated"]:
        httpx.post(f"{url}/subspace/versions/{job['version']}/activate", headers=A).raise_for_status()
    after = httpx.post(f"{url}/score", json={"items": [{"text": "hello"}]}, headers=C).json()
    assert after["subspace"]["version"] == job["version"]


def test_guard_holds_back_the_papers_unlabeled_refit_on_mixed_data(served, dev_rows: list[dict]) -> None:
    """method=saft on the upload alone (the paper's score) disagrees with the active version on mixed data: it is
    published, not activated, and the job says why."""
    url, _, _root = served
    before = httpx.get(f"{url}/subspace", headers=C).json()["version"]
    unlabeled = [{k: v for k, v in r.items() if k != "label"} for r in dev_rows]
    job = _run_refit(url, "layers=8&pooling=response&max_length=128&method=saft", unlabeled)
    assert job["status"] == "succeeded", job
    assert job["refit"]["strategy"] == "saft" and job["activated"] is False and job["held"], job
    assert any("agree" in reason or "drop" in reason for reason in job["held"])
    assert httpx.get(f"{url}/subspace", headers=C).json()["version"] == before
    assert job["version"] in httpx.get(f"{url}/subspace/versions", headers=C).json()["versions"]


def test_full_queue_answers_429_with_retry_after(tmp_path: Path, embedder: Embedder, calibration_rows: list[dict]) -> None:
    fit_active(embedder, calibration_rows, tmp_path / "models")
    env = {"SAFT_MODELS_DIR": str(tmp_path / "models"), "SAFT_SUBSPACE_NAME": "apitest", "SAFT_MAX_QUEUE": "8", "SAFT_FILTER_CHUNK_LINES": "8",
           "SAFT_MAX_BATCH_SIZE": "2", "SAFT_MAX_ITEMS_PER_REQUEST": "8"}
    long_text = "Tell me a long story about the sea and its sailors. " * 12
    with running_server(env, tmp_path / "server.log") as url:

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                return await asyncio.gather(*(client.post("/score", json={"items": [{"text": f"{i} {long_text}"}] * 8})
                                              for i in range(12)))

        responses = asyncio.run(main())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["type"] == "overloaded"
        # The queue drains: the service answers again.
        assert httpx.post(f"{url}/score", json={"items": [{"text": "again"}]}).status_code == 200
        # No admin token configured: admin writes are refused whatever the caller sends.
        r = httpx.post(f"{url}/subspace/versions/v1/activate", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and "admin writes are disabled" in r.json()["error"]


def _items_scored(url: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics").text, "saft_items_scored_total")


def test_client_disconnect_stops_filter_work(served, dev_rows: list[dict]) -> None:
    url, _, _ = served
    lines = [json.dumps({"text": r["text"][:400]}).encode() + b"\n" for r in dev_rows] * 40  # 1280 lines

    def body():  # type: ignore[no-untyped-def]
        yield from lines

    before = _items_scored(url)
    with (
        httpx.Client(timeout=300) as client,
        client.stream("POST", f"{url}/filter", content=body(), headers={**C, "content-type": "application/x-ndjson"}) as r,
    ):
        first = next(r.iter_lines())
        assert json.loads(first)["line"] == 1
        # leaving the block closes the connection mid-stream (and then the client)
    time.sleep(3)
    settled = _items_scored(url)
    time.sleep(3)
    assert _items_scored(url) == settled, "work continued after the client left"
    assert settled - before < len(lines), "the server scored the whole upload for a client that was gone"
    assert httpx.get(f"{url}/readyz").json()["queue_depth"] == 0


def test_cli_scores_through_the_service(served, tmp_path: Path, dev_rows: list[dict]) -> None:
    from typer.testing import CliRunner

    from app.cli import app
    from tests.support import write_jsonl

    url, _snapshot, _ = served
    data = write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in dev_rows[:5]] + ['{"text": ""}'])
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["score", str(data), "-o", str(out), "--url", url, "--token", CLIENT])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[5]["error"].startswith("text: is empty")
    direct = httpx.post(f"{url}/score", headers=C, json={"items": [{k: r[k] for k in ("text", "prompt", "response") if k in r} for r in dev_rows[:5]]}).json()
    assert [r["score"] for r in records[:5]] == [r["score"] for r in direct["results"]]
    assert [r["id"] for r in records[:5]] == [r["id"] for r in dev_rows[:5]]


@pytest.mark.parametrize("grace_s", [600, 0], ids=["long-grace-drains-all", "no-grace-answers-503"])
def test_graceful_shutdown_drains_in_flight_requests(tmp_path: Path, embedder: Embedder, calibration_rows: list[dict],
                                                     grace_s: int) -> None:
    """SIGTERM with three requests queued: within the grace each is scored whole (200); what cannot start within it
    is answered 503 + Retry-After. Never a 500: uvicorn's own deadline, which cancels request tasks, comes later."""
    import signal
    import threading

    from app.launcher import start_server

    fit_active(embedder, calibration_rows, tmp_path / "models")
    env = {"SAFT_MODELS_DIR": str(tmp_path / "models"), "SAFT_SUBSPACE_NAME": "apitest", "SAFT_MAX_BATCH_SIZE": "1",
           "SAFT_SHUTDOWN_GRACE_S": str(grace_s)}
    log = tmp_path / "server.log"
    proc, url = start_server(env, log)
    try:
        results: list[httpx.Response | Exception] = []
        n = 200

        def post(k: int) -> None:  # distinct texts per request: identical ones would share one embedding in flight
            body = {"items": [{"text": f"{k}.{i} " + "a fairly long sentence about gardening and tomatoes " * 10} for i in range(n)]}
            try:
                results.append(httpx.post(f"{url}/score", json=body, timeout=300))
            except httpx.HTTPError as e:
                results.append(e)

        threads = [threading.Thread(target=post, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        # SIGTERM once all three are admitted and most of their items still wait (one item per forward pass)
        wait_for(lambda: httpx.get(f"{url}/readyz").json()["queue_depth"] >= 2 * n, 120, "the three requests queued")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=300)
        statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results]
        text = log.read_text()
        assert "Cancel" not in text and "Exception in ASGI application" not in text, text[-3000:]
        if grace_s:
            assert statuses == [200, 200, 200], statuses
        else:
            assert len(statuses) == 3 and set(statuses) <= {200, 503} and 503 in statuses, statuses
        for r in results:
            assert isinstance(r, httpx.Response)
            if r.status_code == 200:
                assert len(r.json()["results"]) == n
            else:
                assert r.headers["retry-after"] == "1" and r.json()["type"] == "not_ready", r.text
                assert "did not start within the 0 s grace" in r.json()["error"]
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown, hence -15.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
