"""Start the real service (``saft serve``: uvicorn on loopback, the real model) in a subprocess and wait for it.

Owns: a free loopback port, starting ``saft serve`` with an environment, waiting for /healthz, a graceful stop.
Used by the tests, the benchmarks and scripts alike. Must not: import the service in-process (it is a client of a
real process) or know any route beyond /healthz.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(env: dict[str, str], log_path: Path, timeout_s: float = 180.0,
                 cwd: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``saft serve`` (from checkout ``cwd``, default this one) and wait until /healthz answers; the caller owns
    the process."""
    port = free_port()
    full_env = {**os.environ, "SAFT_HOST": "127.0.0.1", "SAFT_PORT": str(port), **env}
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=cwd, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, f"{url}/healthz", log_path, timeout_s)
    except RuntimeError:
        stop_server(proc)
        raise
    return proc, url


def wait_healthy(proc: subprocess.Popen[bytes], health_url: str, log_path: Path, timeout_s: float) -> None:
    """Wait until ``health_url`` answers 200; fail with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{health_url}: server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(health_url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{health_url}: server not up after {timeout_s}s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (graceful: in-flight requests drain), SIGKILL if it does not exit within a minute."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def running_server(env: dict[str, str], log_path: Path, timeout_s: float = 180.0) -> Iterator[str]:
    """Yield the base URL of a started ``saft serve``; stop it with SIGTERM (graceful) afterwards."""
    proc, url = start_server(env, log_path, timeout_s)
    try:
        yield url
    finally:
        stop_server(proc)
