"""Test app: the response head goes out, the body follows a moment later (a streamed reply).

Any app that awaits between `http.response.start` and the last body chunk has this shape:
streaming responses, WSGI apps (each chunk hops from a thread), middleware built on
anyio streams. A drain that begins in that moment must not close the connection after a
head that promised keep-alive.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"3"),
                            (b"x-worker-pid", str(os.getpid()).encode())]})
    await asyncio.sleep(0.005)
    await send({"type": "http.response.body", "body": b"ok\n"})
