"""In-process cost per request, in microseconds, of hello_cluster.metrics.RequestMetrics
and of uvicorn's ProxyHeadersMiddleware (what --forwarded-allow-ips turns on).

Load tests on a small shared machine are noisy; this isolates the middleware: the same
ASGI app called directly, with and without RequestMetrics, in multiprocess mode as the
workers run it. Run with hello-cluster's venv: `.venv/bin/python bench/micro_metrics.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from typing import Any

N = 50_000


async def _loop(app: Any, n: int) -> float:
    # As uvicorn builds it for wrk: a loopback client and one Host header.
    scope = {"type": "http", "method": "GET", "path": "/", "client": ("127.0.0.1", 40000),
             "headers": [(b"host", b"127.0.0.1:8085")]}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    t = time.perf_counter()
    for _ in range(n):
        await app(scope, receive, send)
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="hc-bench-micro-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp  # before prometheus_client is imported
    try:
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        from hello_cluster.app import app
        from hello_cluster.observe.metrics import RequestMetrics

        wrapped = RequestMetrics(app)
        proxied = ProxyHeadersMiddleware(app, trusted_hosts="127.0.0.1")
        bare, metered, proxy = [], [], []
        for _ in range(3):
            bare.append(asyncio.run(_loop(app, N)))
            metered.append(asyncio.run(_loop(wrapped, N)))
            proxy.append(asyncio.run(_loop(proxied, N)))
        b, m, p = sorted(bare)[1], sorted(metered)[1], sorted(proxy)[1]
        print(json.dumps({"app_us": round(b, 2), "with_metrics_us": round(m, 2),
                          "request_metrics_us": round(m - b, 2),
                          "proxy_headers_us": round(p - b, 2)}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
