"""A small httpx client for a running saft service (used by ``saft score --url``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from app.pipeline import Line, Scored, line_record, merge_sides


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
        """One record per line, as the in-process ``saft score`` writes them.

        Each item is sent in canonical form (its turns as ``messages``), so the service scores exactly what this
        process read, whatever shape or column mapping the line came in; a preference row is sent as its two sides.
        """
        for chunk in self._chunks(lines):
            valid = [line for line in chunk if line.item is not None]
            results: dict[int, Scored] = {}
            if valid:
                items = [{"messages": [{"role": role, "content": content} for role, content in item.turns]}
                         for line in valid for item in line.items]
                flat = [Scored(r["score"], r["verdict"], r["truncated"], r["n_tokens"], r["threshold"], r.get("probability"))
                        for r in self.score(items, threshold)["results"]]
                results = {line.number: s for line, s in zip(valid, merge_sides(valid, flat), strict=True)}
            for line in chunk:
                yield line_record(line, results.get(line.number))

    def _chunks(self, lines: Iterable[Line]) -> Iterator[list[Line]]:
        """Lines in requests of at most ``batch_size`` items (a preference row is two)."""
        chunk: list[Line] = []
        size = 0
        for line in lines:
            if chunk and size + len(line.items) > self.batch_size:
                yield chunk
                chunk, size = [], 0
            chunk.append(line)
            size += len(line.items)
        if chunk:
            yield chunk
