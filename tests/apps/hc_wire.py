"""Test app for the wire-level tests of the worker protocols (tests/test_wire.py).

Each endpoint exposes one thing a protocol can get wrong: how it framed the request body
(`/echo` answers with the method, path, query, body length and sha256), whether the app saw
a client leave (`/disconnect` waits for `http.disconnect`, `/seen` tells), bodiless
statuses, a large streamed response for flow control, and a websocket echo.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any
from urllib.parse import parse_qs

from hello_cluster.app import app as hello

SEEN: list[str] = []  # what /disconnect observed, per worker (run these with one worker)


def _query(scope: dict[str, Any], name: str, default: str) -> str:
    return parse_qs(scope.get("query_string", b"").decode()).get(name, [default])[0]


async def _reply(send: Any, body: bytes, status: int = 200,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _websocket(receive: Any, send: Any) -> None:
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        await send({"type": "websocket.send", "text": message.get("text") or "",
                    "bytes": message.get("bytes")} if message.get("bytes") is not None
                   else {"type": "websocket.send", "text": message.get("text") or ""})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await _websocket(receive, send)
        return
    if scope["type"] != "http":
        await hello(scope, receive, send)
        return
    path = scope["path"]
    if path == "/echo":
        digest, size, more = hashlib.sha256(), 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        await _reply(send, json.dumps({
            "method": scope["method"], "path": path,
            "query": scope["query_string"].decode("latin-1"), "length": size,
            "sha256": digest.hexdigest(), "pid": os.getpid()}).encode())
    elif path == "/disconnect":
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                SEEN.append("disconnect")
                return
    elif path == "/seen":
        await _reply(send, ",".join(SEEN).encode())
    elif path == "/status":
        status = int(_query(scope, "code", "204"))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"etag", b'"x"')]})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/big":  # streamed, no content-length: chunked, MiB by MiB
        mib = int(_query(scope, "mb", "64"))
        chunk = b"x" * (1 << 20)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(mib):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/late":  # the head now, the body a second later (a slow upstream)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(1.0)
        await send({"type": "http.response.body", "body": b"late"})
    elif path == "/rss":
        with open(f"/proc/{os.getpid()}/status") as f:
            rss = next(line for line in f if line.startswith("VmRSS:")).split()[1]
        await _reply(send, rss.encode())
    else:
        await hello(scope, receive, send)
