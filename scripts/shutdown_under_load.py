"""One-off check of graceful shutdown under load (issue 18 part 2; not in CI).

    python scripts/shutdown_under_load.py --runs 20 --burners 2            # this tree's server, repeated
    python scripts/shutdown_under_load.py --tree /tmp/old --runs 1         # another checkout's server (a before/after)

Each run: ``--burners`` CPU-bound processes at normal priority on the same cores (the load), a server on the committed
default (``models/default``), three callers posting ``--items`` distinct texts each to /score, SIGTERM once they are
queued; then every answer's status, whether the server log shows uvicorn cancelling request tasks, and the exit code.
A run fails on any status but 200 / 503-with-Retry-After, on a transport error, or on a cancelled task. Server logs of
failing runs are kept (their paths are printed). Prints one JSON line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.launcher import start_server  # this checkout's launcher; the server runs from --tree


def burn() -> None:
    while True:
        pass


def one_run(tree: Path, items: int, log: Path, env: dict[str, str]) -> dict[str, object]:
    proc, url = start_server(env, log, 300, cwd=tree)
    answers: list[object] = []

    def post(k: int) -> None:
        body = {"items": [{"text": f"{k}.{i} a fairly long sentence about gardening and tomatoes " * 10} for i in range(items)]}
        try:
            r = httpx.post(f"{url}/score", json=body, timeout=600)
            answers.append(r.status_code if r.status_code != 503 or r.headers.get("retry-after") else "503 without Retry-After")
        except httpx.HTTPError as e:
            answers.append(f"{type(e).__name__}")

    threads = [threading.Thread(target=post, args=(k,)) for k in range(3)]
    start = time.monotonic()
    for t in threads:
        t.start()
    while httpx.get(f"{url}/readyz", timeout=30).json()["queue_depth"] < 2 * items and time.monotonic() - start < 300:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=900)
    code = proc.wait(timeout=120)
    text = log.read_text()
    cancelled = "Cancel" in text or "Exception in ASGI application" in text
    ok = not cancelled and all(a in (200, 503) for a in answers) and len(answers) == 3
    return {"ok": ok, "answers": answers, "cancelled_tasks": cancelled, "exit": code, "seconds": round(time.monotonic() - start, 1),
            "log": str(log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="checkout whose server runs")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--burners", type=int, default=2)
    parser.add_argument("--items", type=int, default=200, help="texts per caller (three callers)")
    parser.add_argument("--env", action="append", default=[], help="extra server setting, NAME=VALUE")
    args = parser.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    failures = 0
    try:
        for i in range(args.runs):
            log = Path(tempfile.mkdtemp(prefix="saft-shutdown-")) / "server.log"
            result = one_run(args.tree.resolve(), args.items, log, env)
            failures += not result["ok"]
            if result["ok"]:
                log.unlink()
            print(json.dumps({"run": i + 1, **result}), flush=True)
    finally:
        for b in burners:
            b.kill()
    print(json.dumps({"runs": args.runs, "failures": failures, "burners": args.burners, "items_per_caller": args.items}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
