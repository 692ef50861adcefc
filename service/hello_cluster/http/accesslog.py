"""The access log: one line per HTTP request, written by the worker that served it.

An ASGI middleware rather than uvicorn's access logger, because uvicorn's logs before the
response body is sent (no byte count, no duration) and knows nothing of worker slots. It
sits inside uvicorn's ProxyHeadersMiddleware, so with --forwarded-allow-ips the client is
the one the trusted proxy named. With --no-access-log (the default) the worker does not
wrap the app at all: nothing is added to the request path.

Lines go to stderr with the rest of the log, in the same shape as the log's other lines
(text, journald or JSON, logs.py), but not through `logging`: a LogRecord, its filters,
the handler lock and a write per line cost about 19 us a request, half a hello page's
throughput. Here a line is formatted directly (the timestamp prefix is built once a
second) and lines are written together every FLUSH_EVERY seconds, or sooner when many are
waiting, and when the worker stops. A worker killed by SIGKILL loses at most its last
tenth of a second of lines, like its request metrics. Anything a client sends is escaped
before it reaches a line, so a request cannot forge a second log line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable
from json.encoder import encode_basestring_ascii as _q  # a JSON string literal, in C
from typing import Any

from hello_cluster import logs

FLUSH_EVERY = 0.1  # seconds a line may wait in the buffer
FLUSH_LINES = 256  # or this many lines, whichever comes first

# Control characters, DEL, and the quote that delimits the request in a text line.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, ord('"'), ord("\\"))}


def escape(text: str) -> str:
    """Printable and one line whatever the client sent."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the common case, ten times cheaper than translate()
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


def log_style() -> str:
    """Which of logs.py's shapes the worker's log has: json, journal or text."""
    handlers = logging.getLogger().handlers
    formatter = handlers[0].formatter if handlers else None
    if isinstance(formatter, logs.JsonFormatter):
        return "json"
    if isinstance(formatter, logs.JournalFormatter):
        return "journal"
    return "text"


class AccessLog:
    """Wraps the app; logs after the response is complete (or the app failed).

    The operator asked for these lines: they are written whatever --log-level says.
    """

    def __init__(self, app: Any, slot: int, style: str | None = None) -> None:
        self.app = app
        self.slot = slot
        self.role = f"worker {slot}"
        self.pid = os.getpid()
        self.style = style or log_style()
        self.lines: list[str] = []
        self._second = -1
        self._stamp = self._utc = ""
        self._flush_due = False

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
        message = f'{who} "{method} {what} HTTP/{version}" {status} {sent} {elapsed * 1000:.1f}ms'
        now = time.time()
        second = int(now)
        if second != self._second:  # timestamps to the second, built once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        if self.style == "json":  # logs.JsonFormatter's keys, then the access fields
            self.lines.append(
                f'{{"time": "{self._utc}.{int(now * 1000) % 1000:03d}Z", "level": "info", '
                f'"pid": {self.pid}, "role": "{self.role}", "logger": "hello_cluster.access", '
                f'"message": {_q(message)}, "event": "access", "client": {_q(who)}, '
                f'"method": {_q(method)}, "path": {_q(what)}, "http_version": {_q(version)}, '
                f'"status": {status}, "bytes": {sent}, '
                f'"duration_ms": {round(elapsed * 1000, 3)!r}, "slot": {self.slot}}}\n')
        elif self.style == "journal":  # journald adds time and pid; <6> is info
            self.lines.append(f"<6>{self.role} pid {self.pid}: {message}\n")
        else:  # logging's default asctime, as logs.py's text format prints it
            self.lines.append(f"{self._stamp},{int(now * 1000) % 1000:03d} hello-cluster"
                              f"[{self.pid}] {self.role} INFO {message}\n")
        if len(self.lines) >= FLUSH_LINES:
            self.flush()
        elif not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        """Write the waiting lines in one go (the worker also calls this when it stops)."""
        self._flush_due = False
        if not self.lines:
            return
        text, self.lines = "".join(self.lines), []
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr gone (closed pipe): nothing left to tell
