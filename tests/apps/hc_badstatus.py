"""Test app for issue 22 item 1: `/status?v=<json>` starts its response with that status
value as sent by a careless app ("200", 99, 600, 200.0, true, null); `/` is a plain 200, and
`/stream` sends 8 MiB in 64 KiB pieces slowly, a download that must survive a neighbour's
mistake on the same worker."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from urllib.parse import parse_qs


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/status":
        value = json.loads(parse_qs(scope["query_string"].decode())["v"][0])
        await send({"type": "http.response.start", "status": value,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"no"})
        return
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(128 * 65536).encode())]})
        for i in range(128):
            await send({"type": "http.response.body", "body": b"x" * 65536,
                        "more_body": i < 127})
            await asyncio.sleep(0.01)
        return
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
