"""Rows for the pipeline-filter tests (datatrove, NeMo Curator) and ``saft filter``'s verdicts on them, the reference
both pipelines are held to; and the README examples those tests run as written."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from app.cli import app
from app.config import PROJECT_ROOT
from tests.conftest import DATA_DIR, write_jsonl

#: Rows that are no sample: a blank text, and keys that fit no shape.
INVALID = [{"id": "bad-blank", "text": "   "}, {"id": "bad-keys", "note": "no sample here"}]


def pipeline_rows(per_group: int = 3, max_chars: int = 500) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``per_group`` short dev lines of each (kind, label), as they are (with a ``text``); and rows without a usable
    text: two of those pairs (a harmful and a benign one) as chat ``messages``, and the ``INVALID`` rows."""
    rows = [json.loads(line) for line in (DATA_DIR / "dev_eval.jsonl").open()]
    random.Random(5).shuffle(rows)
    picked: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], int] = {}
    for row in rows:
        key = (row["kind"], row["label"])
        if len(row["text"]) < max_chars and seen.get(key, 0) < per_group:
            seen[key] = seen.get(key, 0) + 1
            picked.append(row)
    pairs = [next(r for r in picked if r["kind"] == "pair" and r["label"] == label) for label in (1, 0)]
    chats = [{"id": f"m-{r['id']}", "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
             for r in pairs]
    return picked, chats + INVALID


def write_data(root: Path) -> Path:
    """``root/data/items.jsonl`` (the dev lines) and ``root/data/chat.jsonl`` (messages and invalid rows)."""
    texts, others = pipeline_rows()
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "items.jsonl", texts)
    write_jsonl(data / "chat.jsonl", others)
    return data


def saft_filter_reference(data: Path, out: Path) -> dict[str, dict[str, Any]]:
    """``saft filter`` on every file of ``data`` (one after the other, as one input): each row's score record by id,
    with the bucket the CLI put it in (kept / dropped / rejected)."""
    lines = [line for path in sorted(data.glob("*.jsonl")) for line in path.read_text().splitlines()]
    write_jsonl(out / "all.jsonl", lines)
    args = ["filter", str(out / "all.jsonl"), *(x for name in ("kept", "dropped", "rejected", "scores")
                                               for x in (f"--{name}", str(out / f"{name}.jsonl")))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    reference = {}
    for bucket in ("kept", "dropped", "rejected"):
        for line in (out / f"{bucket}.jsonl").read_text().splitlines():
            obj = json.loads(line)
            reference[(obj.get("item") or {}).get("id") if bucket == "rejected" else obj["id"]] = {"bucket": bucket}
    for line in (out / "scores.jsonl").read_text().splitlines():
        rec = json.loads(line)
        reference[rec["id"]].update(rec)
    assert len(reference) == len(lines)
    return reference


def readme_example(name: str) -> str:
    """The Python block that follows ``<!-- example: name -->`` in README.md."""
    text = (PROJECT_ROOT / "README.md").read_text()
    found = re.search(rf"<!-- example: {re.escape(name)} -->\n```python\n(.*?)\n```", text, re.DOTALL)
    assert found, f"README.md has no example {name!r}"
    return found.group(1)
