"""In-process cost per request, in microseconds, of hello_cluster.accesslog.AccessLog.

The same ASGI app called directly, bare and wrapped, with logging set up as a worker sets
it up (text or JSON) and stderr pointed at a file, as under a process manager that
collects it. For comparison, `via_logging_*` is one `logging` call per request with the
same message and fields (what the first version of AccessLog did). The minimum of five
runs is reported: on a shared machine, noise only ever adds time.
Run with hello-cluster's venv: `.venv/bin/python bench/micro_accesslog.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

N = 30_000


async def _loop(app: Any, n: int) -> float:
    scope = {"type": "http", "method": "GET", "path": "/", "raw_path": b"/",
             "query_string": b"", "http_version": "1.1", "client": ("127.0.0.1", 40000),
             "headers": [(b"host", b"127.0.0.1:8085")]}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    t = time.perf_counter()
    for _ in range(n):
        await app(scope, receive, send)
    return (time.perf_counter() - t) / n * 1e6


def _via_logging(n: int) -> float:
    log = logging.getLogger("hello_cluster.access.reference")
    log.setLevel(logging.INFO)
    t = time.perf_counter()
    for _ in range(n):
        log.info('%s "%s %s HTTP/%s" %d %d %.1fms', "127.0.0.1:40000", "GET", "/", "1.1", 200,
                 43, 0.1, extra={"fields": {
                     "event": "access", "client": "127.0.0.1:40000", "method": "GET",
                     "path": "/", "http_version": "1.1", "status": 200, "bytes": 43,
                     "duration_ms": 0.1, "slot": 1}})
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    from hello_cluster import logs
    from hello_cluster.app import app
    from hello_cluster.http.accesslog import AccessLog

    results: dict[str, float] = {}
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            for fmt in ("text", "json"):
                logs.setup("info", fmt)
                bare, logged, reference = [], [], []
                for _ in range(5):
                    bare.append(asyncio.run(_loop(app, N)))
                    logged.append(asyncio.run(_loop(AccessLog(app, 1), N)))
                    reference.append(_via_logging(N))
                results[f"access_log_{fmt}_us"] = round(min(logged) - min(bare), 2)
                results[f"via_logging_{fmt}_us"] = round(min(reference), 2)
                results["app_us"] = round(min(bare), 2)
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
