"""A plain ASGI app traced and counted with the OpenTelemetry API.

`trace.get_tracer` and `metrics.get_meter` at import return proxies: under `--preload` the
app is imported in the template, before any worker's `post_fork` (hooks.py) has set the
providers, and the proxies forward to them from then on.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import metrics, trace

tracer = trace.get_tracer("hello-otel.app")
requests = metrics.get_meter("hello-otel.app").create_counter(
    "app.requests", unit="{request}", description="requests answered by this worker")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "http":
        return
    with tracer.start_as_current_span(f"{scope['method']} {scope['path']}") as span:
        span.set_attribute("http.request.method", scope["method"])
        span.set_attribute("url.path", scope["path"])
        requests.add(1, {"url.path": scope["path"]})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"x-worker-pid", str(os.getpid()).encode())]})
        await send({"type": "http.response.body", "body": b"traced\n"})
