"""What several test modules share, in one place: data paths and writers, fitted subspaces and manifests, a real
redis-server, waiting for refit jobs, reading Prometheus metrics, and the pipeline-filter rows with their reference.

Owns: helpers only, no fixtures (those live in conftest.py) and no assertions about behaviour. The service process
itself is started by ``app.launcher`` (the benchmarks use it too).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from app.cli import app
from app.config import PROJECT_ROOT
from app.core.embedding import Embedder, EmbeddingConfig
from app.core.manifest import Manifest
from app.core.pipeline import FitOptions, fit_lines, parse_line
from app.core.quality import ThresholdPolicy
from app.core.subspace import Subspace
from app.launcher import free_port
from app.store.artifacts import save_version
from app.store.registry import ActiveSubspace

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

#: A fast fit for the end-to-end tests (layer 8, 128 tokens): what they check is the plumbing, not the quality.
FAST_OPTIONS = FitOptions(EmbeddingConfig(layers=(8,), pooling="response", max_length=128), method="lda", center="kind",
                          shrinkage=0.5, policy=ThresholdPolicy("max_f1"))


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row))
            fh.write("\n")
    return path


def install_default_v1(models: Path) -> Path:
    """A models dir holding only the committed ``default/v1``, active: the fleet tests count versions from it."""
    shutil.copytree(PROJECT_ROOT / "models" / "default" / "v1", models / "default" / "v1")
    (models / "default" / "ACTIVE").write_text("v1\n")
    return models


def fit_active(embedder: Embedder, rows: list[dict], models: Path, name: str = "apitest") -> ActiveSubspace:
    """Fit ``FAST_OPTIONS`` on ``rows`` with the real model and publish it (active) under ``models``."""
    lines = [parse_line(i + 1, json.dumps(r)) for i, r in enumerate(rows)]
    result = fit_lines(embedder, lines, FAST_OPTIONS, name=name, calibration_digest="test")
    manifest = save_version(models, result.subspace, result.manifest)
    return ActiveSubspace(result.subspace, manifest)


def random_subspace(seed: int = 0) -> tuple[Subspace, np.ndarray]:
    """A SAFT subspace fitted on 50 random 16-d rows (half text, half pair), and those rows."""
    X = np.random.default_rng(seed).normal(size=(50, 16)).astype(np.float32)
    return Subspace(k=2).fit(X, ["text"] * 25 + ["pair"] * 25), X


def demo_manifest(digest: str = "0" * 64) -> Manifest:
    """The manifest ``random_subspace`` is published with."""
    return Manifest(
        name="demo", model_id="smollm2-135m-instruct", weights_digest=digest, embedding=EmbeddingConfig(layers=(3,)),
        method="saft", k=2, center="global", standardize=True, shrinkage=0.1, signed=False, kinds=["pair", "text"],
        threshold=1.5, threshold_policy=ThresholdPolicy("drop_rate", 0.1), calibration={"sha256": "x", "n_samples": 50},
    )


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``check`` every 0.1 s until it holds; the seconds it took, or AssertionError naming ``what``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def wait_job(url: str, job_id: str, headers: Mapping[str, str], timeout_s: float = 600) -> dict[str, Any]:
    """The refit job's final state (succeeded or failed), polled from ``GET /subspace/jobs/{id}``."""
    state: dict[str, Any] = {}

    def done() -> bool:
        nonlocal state
        state = httpx.get(f"{url}/subspace/jobs/{job_id}", headers=dict(headers)).json()
        return state["status"] in ("succeeded", "failed")

    wait_for(done, timeout_s, f"job {job_id} finished")
    return state


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sum of the samples named ``name`` (a counter's ``_total`` included) whose labels include ``labels``, read
    from Prometheus' text format with its own parser; 0 when there is none."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


# --------------------------------------------------------------------------------------------- a real redis-server
class RedisServer:
    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: run scripts/setup.sh (make test installs it)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"],
            stdout=(self.dir / "redis.log").open("ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()[-2000:]}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: an outage, not a clean shutdown."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def wipe(self) -> None:
        self.kill()
        for path in self.dir.glob("appendonly*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def stop(self) -> None:
        self.kill()


# ----------------------------------------------------------------------- the pipeline filters' rows and reference
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
