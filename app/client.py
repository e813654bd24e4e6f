"""A small httpx client for a running saft service (used by ``saft score --url``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from app.pipeline import Line, Scored, chunks, line_record


class SaftClient:
    """Score items against a saft-filter service; retries 429 after its Retry-After."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 300.0, batch_size: int = 64) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.batch_size = batch_size

    def __enter__(self) -> SaftClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        for _ in range(30):
            response = self._http.post(path, **kwargs)
            if response.status_code != 429:
                break
            time.sleep(float(response.headers.get("Retry-After", "1")))
        if response.status_code >= 400:
            raise httpx.HTTPStatusError(f"{response.status_code}: {response.text}", request=response.request, response=response)
        return response

    def score(self, items: list[dict[str, Any]], threshold: float | None = None) -> dict[str, Any]:
        return self._post("/score", json={"items": items, "threshold": threshold}).json()

    def score_lines(self, lines: Iterable[Line], threshold: float | None = None) -> Iterator[dict[str, Any]]:
        """One record per line, as the in-process ``saft score`` writes them."""
        for chunk in chunks(lines, self.batch_size):
            valid = [line for line in chunk if line.item is not None]
            results: dict[int, dict[str, Any]] = {}
            if valid:
                items = [{k: v for k, v in (line.obj or {}).items() if k in ("text", "prompt", "response", "messages")}
                         for line in valid]
                body = self.score(items, threshold)
                results = {line.number: r for line, r in zip(valid, body["results"], strict=True)}
            for line in chunk:
                r = results.get(line.number)
                yield line_record(line, None if r is None else Scored(r["score"], r["verdict"], r["truncated"], r["n_tokens"],
                                                                             r["threshold"]))
