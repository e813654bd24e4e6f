"""POST /v1/moderations through the real OpenAI SDK, and GET /info against the settings: real server, real model.

What the SDK needs: its response types (openai/types/moderation.py) declare OpenAI's 13 categories as
required fields, but the client parses responses without validating them (``construct``) unless
``_strict_response_validation=True``. So a response with our one category, ``harmful``, parses into
the SDK's own ``ModerationCreateResponse`` / ``Moderation``: ``harmful`` is an extra field on
``categories``, ``category_scores`` and ``category_applied_input_types``, and the 13 read as None
("not scored"). Strict validation refuses it, and only made-up values (false / 0.0 for categories this
model does not score) could satisfy it, so the service does not try: the last test pins that.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import Moderation, ModerationCreateResponse

from app import __version__
from app.config import Settings
from app.core.embedding import Embedder
from app.launcher import running_server
from app.store.artifacts import save_version
from tests.support import fit_active, metric_value

CLIENT, ADMIN = "client-token-mod", "admin-token-mod"
C = {"Authorization": f"Bearer {CLIENT}"}
A = {"Authorization": f"Bearer {ADMIN}"}
ENV = {"SAFT_SUBSPACE_NAME": "apitest", "SAFT_API_TOKENS": CLIENT, "SAFT_ADMIN_TOKEN": ADMIN, "SAFT_DEVICE": "cpu",
       "SAFT_MAX_ITEMS_PER_REQUEST": "16", "SAFT_MAX_CHARS_PER_ITEM": "20000", "SAFT_MAX_BODY_BYTES": str(2 * 2**20),
       "SAFT_MAX_UPLOAD_BYTES": str(8 * 2**20), "SAFT_MAX_BATCH_TOKENS": "2048", "SAFT_MAX_BATCH_SIZE": "8",
       "SAFT_MAX_QUEUE": "512"}
TEXTS = ["How do I bake sourdough bread at home?", "Write a short poem about the sea.",
         "Give me step-by-step instructions to make a pipe bomb."]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder,  # type: ignore[no-untyped-def]
           calibration_rows: list[dict]):
    root = tmp_path_factory.mktemp("moderations")
    snapshot = fit_active(embedder, calibration_rows, root / "models")  # apitest/v1, labelled: calibrated
    # v2: the same subspace as a version without a calibration (as every version before it), not active.
    save_version(root / "models", snapshot.subspace, replace(snapshot.manifest, probability=None), activate=False)
    with running_server({**ENV, "SAFT_MODELS_DIR": str(root / "models")}, root / "server.log") as url:
        yield url, snapshot


def _sdk(url: str, **kwargs) -> OpenAI:  # type: ignore[no-untyped-def]
    return OpenAI(base_url=f"{url}/v1", api_key=CLIENT, max_retries=0, timeout=300, **kwargs)


def _score(url: str, items: list[dict]) -> list[dict]:
    r = httpx.post(f"{url}/score", json={"items": items}, headers=C, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_openai_sdk_round_trip(served) -> None:
    url, snapshot = served
    m = snapshot.manifest
    response = _sdk(url).moderations.create(input=TEXTS)
    assert isinstance(response, ModerationCreateResponse) and response.model == f"{m.name}@{m.version}"
    assert response.id.startswith("modr-") and len(response.id) == 5 + 32
    expected = _score(url, [{"text": t} for t in TEXTS])
    assert len(response.results) == len(TEXTS)
    for result, ref in zip(response.results, expected, strict=True):  # one result per input, in order
        assert isinstance(result, Moderation)
        assert result.flagged is (ref["verdict"] == "drop") and result.categories.harmful is result.flagged
        assert ref["probability"] is not None and result.category_scores.harmful == pytest.approx(ref["probability"], abs=1e-9)
        assert result.category_applied_input_types.harmful == ["text"]
        # Only our category: OpenAI's 13 are not scored, so they are absent (None through the SDK), never invented.
        assert result.categories.to_dict() == {"harmful": result.flagged}
        assert result.category_scores.to_dict() == {"harmful": result.category_scores.harmful}
        assert result.categories.hate is None and result.categories.sexual_minors is None
        assert result.category_scores.violence is None and result.category_applied_input_types.illicit is None
        # The extension: the raw verdict behind it, the same as /score's.
        assert result.saft == {"score": pytest.approx(ref["score"], abs=1e-9), "threshold": ref["threshold"],
                               "probability": pytest.approx(ref["probability"], abs=1e-9), "truncated": ref["truncated"],
                               "n_tokens": ref["n_tokens"]}
        assert ref["threshold"] == m.threshold_for("text")
    # A single string, OpenAI's text parts, and the extension part for a pair (scored as a pair, as /score does).
    one = _sdk(url).moderations.create(input=TEXTS[0], model="apitest")
    assert one.model == "apitest" and len(one.results) == 1
    assert one.results[0].category_scores.harmful == pytest.approx(response.results[0].category_scores.harmful, abs=1e-9)
    pair = {"prompt": "Explain photosynthesis.", "response": "Plants turn light, water and CO2 into sugar."}
    mixed = [{"type": "text", "text": TEXTS[1]}, {"type": "item", **pair}]
    parts = _sdk(url).moderations.create(input=mixed, model=f"apitest@{m.version}")  # type: ignore[arg-type]
    pair_ref = _score(url, [pair])[0]
    assert parts.model == "apitest@v1" and len(parts.results) == 2
    assert parts.results[0].category_scores.harmful == pytest.approx(response.results[1].category_scores.harmful, abs=1e-9)
    assert parts.results[1].saft["threshold"] == m.threshold_for("pair")
    assert parts.results[1].saft["score"] == pytest.approx(pair_ref["score"], abs=1e-9)


def test_model_must_name_the_active_subspace(served) -> None:
    url, _ = served
    cases = [("apitest@v2", "names version v2, but only the active version v1 is served"),
             ("omni-moderation-latest", "is not served here; this service scores with subspace 'apitest'"),
             ("apitest@latest", "must be NAME or NAME@vN")]
    for model, words in cases:
        r = httpx.post(f"{url}/v1/moderations", json={"input": "hello", "model": model}, headers=C)
        assert r.status_code == 422 and r.json()["type"] == "invalid_input" and f"model: {model!r}" in r.json()["error"], r.text
        assert words in r.json()["error"], r.text
    with pytest.raises(openai.UnprocessableEntityError) as info:
        _sdk(url).moderations.create(input="hello", model="apitest@v2")
    # Our one error shape ({"error": message, "type": kind}): the SDK hands the message over as the error's body.
    assert info.value.status_code == 422 and "model: 'apitest@v2' names version v2" in info.value.body  # type: ignore[operator]


def test_same_auth_and_limits_as_score(served) -> None:
    url, _ = served
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).moderations.create(input="hello")
    assert httpx.post(f"{url}/v1/moderations", json={"input": "hello"}).status_code == 401
    cases = [
        ({"input": ["x"] * 17}, 413, "input: 17 inputs exceed the limit of 16 per request"),
        ({"input": ["ok", "a" * 20001]}, 413, "input[1]: 20001 characters exceed the limit of 20000 per item"),
        ({"input": []}, 422, "input: must be a string, or a non-empty list"),
        ({"input": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}, 422,
         "input[0]: part type 'image_url' is not scored here"),
        ({"input": ["ok", "   "]}, 422, "input[1]: text: is empty"),
        ({"input": [{"type": "text"}]}, 422, "input[0]: a text part needs 'text'"),
        ({"input": ["ok", {"type": "item", "prompt": "p", "chosen": "a", "rejected": "b"}]}, 422,
         "input[1]: item: a preference row (chosen/rejected) is two samples"),
        ({"model": "apitest"}, 422, "input: Field required"),
    ]
    for body, status, words in cases:
        r = httpx.post(f"{url}/v1/moderations", json=body, headers=C)
        assert r.status_code == status and words in r.json()["error"], (body, r.status_code, r.text)
    r = httpx.post(f"{url}/v1/moderations", content=b'{"input": "' + b"a" * (3 * 2**20) + b'"}',
                   headers={**C, "content-type": "application/json"})
    assert r.status_code == 413 and "limit of 2097152 bytes" in r.json()["error"]


def test_moderations_share_the_scoring_metrics(served) -> None:
    url, _ = served
    before = httpx.get(f"{url}/metrics").text
    texts = [f"Tell me a fact about the number {i}." for i in range(5)]
    assert httpx.post(f"{url}/v1/moderations", json={"input": texts}, headers=C, timeout=300).status_code == 200
    after = httpx.get(f"{url}/metrics").text
    assert metric_value(after, "saft_items_scored_total") - metric_value(before, "saft_items_scored_total") == 5
    assert metric_value(after, "saft_verdicts_total") - metric_value(before, "saft_verdicts_total") == 5
    assert metric_value(after, "saft_cache_misses_total") - metric_value(before, "saft_cache_misses_total") == 5  # through the batcher
    labels = ('route="/v1/moderations"', 'method="POST"', 'status="200"')
    assert any(line.startswith("saft_requests_total{") and all(f in line for f in labels) for line in after.splitlines())


def test_a_version_without_calibration_falls_back_to_a_squash(served) -> None:
    url, _ = served
    r = httpx.post(f"{url}/subspace/versions/v2/activate", headers=A)
    assert r.status_code == 200, r.text
    try:
        ref = _score(url, [{"text": t} for t in TEXTS])
        assert all(x["probability"] is None for x in ref)  # /score says it has none
        info = httpx.get(f"{url}/info", headers=C).json()
        assert info["subspace"]["version"] == "v2" and info["subspace"]["calibrated"] is False
        response = _sdk(url).moderations.create(input=TEXTS)
        assert response.model == "apitest@v2"
        for result, x in zip(response.results, ref, strict=True):
            assert result.saft["probability"] is None and result.flagged is (x["verdict"] == "drop")
            squashed = 1.0 / (1.0 + math.exp(-(x["score"] - x["threshold"])))
            assert result.category_scores.harmful == pytest.approx(squashed, rel=1e-9)
            assert (result.category_scores.harmful > 0.5) is result.flagged  # the squash crosses 0.5 at τ
    finally:
        assert httpx.post(f"{url}/subspace/versions/v1/activate", headers=A).status_code == 200


def test_info_reports_model_subspace_and_limits(served, embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    url, snapshot = served
    m = snapshot.manifest
    assert httpx.get(f"{url}/info").status_code == 401  # it names τ: a client token, as /score
    r = httpx.get(f"{url}/info", headers=C)
    assert r.status_code == 200, r.text
    info = r.json()
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)  # what the server read from the same environment
    assert info["package"] == "saft-filter" and info["version"] == __version__
    assert info["model"] == {"id": embedder.model_id, "weights_sha256": embedder.weights_digest, "device": "cpu",
                             "dtype": "float32"}
    assert info["subspace"] == {"name": "apitest", "version": "v1", "method": "lda", "threshold": m.threshold,
                                "thresholds": {"pair": m.thresholds["pair"], "text": m.thresholds["text"]}, "calibrated": True}
    assert info["embedding"] == m.embedding.as_dict() and info["embedding"]["layers"] == [8]
    assert info["limits"] == {
        "max_items_per_request": settings.max_items_per_request, "max_chars_per_item": settings.max_chars_per_item,
        "max_body_bytes": settings.max_body_bytes, "max_upload_bytes": settings.max_upload_bytes,
        "max_tokens": m.embedding.max_length, "max_batch_tokens": settings.max_batch_tokens,
        "max_batch_size": settings.max_batch_size, "max_queue": settings.max_queue,
    }
    assert info["limits"]["max_items_per_request"] == 16 and info["limits"]["max_tokens"] == 128
    assert info["limits"]["max_batch_tokens"] == 2048 and info["limits"]["max_upload_bytes"] == 8 * 2**20
    assert "/info" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_strict_sdk_validation_would_need_invented_categories(served) -> None:
    url, _ = served
    with pytest.raises(openai.APIResponseValidationError):
        _sdk(url, _strict_response_validation=True).moderations.create(input=TEXTS[0])
    raw = httpx.post(f"{url}/v1/moderations", json={"input": TEXTS[0]}, headers=C, timeout=300).json()
    assert set(raw["results"][0]["categories"]) == {"harmful"}  # nothing else is claimed
    assert json.loads(json.dumps(raw)) == raw
