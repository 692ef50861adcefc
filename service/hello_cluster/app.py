"""The built-in hello page: Node's cluster demo, answered by whichever worker got the connection.

A raw ASGI callable rather than a framework: it is the benchmark's subject, so it should cost
no more than the engine around it. `x-worker-pid` lets a user watch requests spread.
"""

from __future__ import annotations

import os
from typing import Any

BODY = b"<h1>Hello Python!</h1><p>Hello Cluster!</p>"
_STATIC_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-length", str(len(BODY)).encode()),
]


def _headers() -> list[tuple[bytes, bytes]]:
    # The pid changes across fork(), so compute it in the worker, once.
    return [*_STATIC_HEADERS, (b"x-worker-pid", str(os.getpid()).encode())]


# This process's headers, made on the first request and forgotten in a forked child. Not
# keyed by os.getpid() per request: on Linux that is a syscall (about 0.17 us), and a
# keep-alive response costs only two others (its read and its write).
_cache: list[list[tuple[bytes, bytes]]] = []
os.register_at_fork(after_in_child=_cache.clear)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    kind = scope["type"]
    if kind == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if kind != "http":
        return
    if not _cache:
        _cache.append(_headers())
    headers = _cache[0]
    if scope["method"] not in ("GET", "HEAD"):
        await send({"type": "http.response.start", "status": 405,
                    "headers": [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body",
                "body": b"" if scope["method"] == "HEAD" else BODY})


# It never waits and needs no Task of its own: the fast protocol runs it eagerly, without
# making a Task per request (http/fastproto.py, FastProtocol._run_eager).
app.hello_cluster_eager = True  # type: ignore[attr-defined]
