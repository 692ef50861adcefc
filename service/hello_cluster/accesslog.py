"""The access log: one line per HTTP request, written by the worker that served it.

An ASGI middleware rather than uvicorn's access logger, because uvicorn's logs before the
response body is sent (no byte count, no duration) and knows nothing of worker slots. It
sits inside uvicorn's ProxyHeadersMiddleware, so with --forwarded-allow-ips the client is
the one the trusted proxy named. With --no-access-log (the default) the worker does not
wrap the app at all: nothing is added to the request path.

Lines go through `logging` to stderr with the rest of the log (text, journald or JSON,
logs.py). Anything a client sends is escaped before it reaches a text line, so a request
cannot forge a second log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger("hello_cluster.access")

# Control characters, DEL, and the quote that delimits the request in a text line.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, ord('"'), ord("\\"))}


def escape(text: str) -> str:
    """Printable and one line whatever the client sent."""
    return text.translate(_ESCAPES)


def target(scope: dict[str, Any]) -> str:
    """The request target as the client sent it: raw path and query string."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope.get("root_path", "") + scope["path"]
    query = scope.get("query_string", b"")
    return escape(f"{path}?{query.decode('latin-1')}" if query else path)


def client(scope: dict[str, Any]) -> str:
    peer = scope.get("client")
    if not peer:
        return "-"
    host, port = peer[0], peer[1]
    return escape(f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}")


class AccessLog:
    """Wraps the app; logs after the response is complete (or the app failed)."""

    def __init__(self, app: Any, slot: int) -> None:
        self.app = app
        self.slot = slot
        # The operator asked for these lines: they show whatever --log-level says.
        log.setLevel(logging.INFO)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        sent = 0

        def counting_send(message: dict[str, Any]) -> Awaitable[None]:
            nonlocal status, sent
            kind = message["type"]
            if kind == "http.response.body":
                sent += len(message.get("body", b""))
            elif kind == "http.response.start":
                status = message["status"]
            return send(message)  # type: ignore[no-any-return]

        try:
            await self.app(scope, receive, counting_send)
        finally:
            # No response started: uvicorn answers 500 for an app that raised.
            self.write(scope, status or 500, sent, time.perf_counter() - start)

    def write(self, scope: dict[str, Any], status: int, sent: int, elapsed: float) -> None:
        who, method, what = client(scope), escape(scope["method"]), target(scope)
        version = escape(str(scope.get("http_version", "1.1")))
        log.info('%s "%s %s HTTP/%s" %d %d %.1fms', who, method, what, version, status, sent,
                 elapsed * 1000, extra={"fields": {
                     "event": "access", "client": who, "method": method, "path": what,
                     "http_version": version, "status": status, "bytes": sent,
                     "duration_ms": round(elapsed * 1000, 3), "slot": self.slot}})
