"""Test app for tests/test_rfc.py: answers with what the server made of the request.

`/` (any method) reads the whole body and answers JSON: method, path, http_version, the
headers as the app sees them and the body length. `/early` answers without reading the
body; `/stream?mib=N&pace=S` streams N MiB in 64 KiB pieces, S seconds apart; `/slow`
answers after 0.3 s.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qs


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    if path == "/stream":
        query = parse_qs(scope["query_string"].decode())
        mib = int(query.get("mib", ["1"])[0])
        pace = float(query.get("pace", ["0"])[0])  # seconds between pieces
        piece = b"s" * 65536
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % (mib * 16 * len(piece)))]})
        for _ in range(mib * 16):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            if pace:
                await asyncio.sleep(pace)
        await send({"type": "http.response.body", "body": b""})
        return
    size = 0
    if path != "/early":
        if path == "/slow":
            await asyncio.sleep(0.3)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
    body = json.dumps({"method": scope["method"], "path": path,
                       "version": scope["http_version"], "body": size,
                       "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                                   for k, v in scope["headers"]]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
