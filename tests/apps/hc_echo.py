"""Test app for uploads and differential tests: says what it received, so two servers'
answers to the same bytes can be compared by body.

- `/early` answers 405 without reading the body (an early answer to an unread upload);
- `/slow?s=N` waits N seconds before answering (a request in flight);
- anything else reads the whole body and answers `METHOD PATH QUERY LENGTH SHA256`, where
  the hash is of the body the app received (so a smuggled or truncated body shows).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any


async def _reply(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[-1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/early":
        await _reply(send, 405, b"not reading that\n")
        return
    if scope["path"] == "/slow":
        seconds = float(scope["query_string"].decode().partition("s=")[2] or "1")
        await asyncio.sleep(min(seconds, 30.0))
    digest = hashlib.sha256()
    length = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return
        chunk = message.get("body", b"")
        length += len(chunk)
        digest.update(chunk)
        if not message.get("more_body", False):
            break
    summary = b" ".join([scope["method"].encode(), scope["raw_path"],
                         scope["query_string"] or b"-", str(length).encode(),
                         digest.hexdigest().encode()])
    await _reply(send, 200, summary + b"\n")


async def eager_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The same app, declared eager (FastProtocol._run_eager): the differential battery
    then meets the eager start, with the requests that wait (`/slow`, bodies that come in
    later reads) continuing in a Task."""
    await app(scope, receive, send)


eager_app.hello_cluster_eager = True  # type: ignore[attr-defined]
