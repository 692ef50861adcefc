"""Test app: handlers that block the event loop, spin, or wait forever, each on its own line.

The tests find these functions and lines in stack dumps, stall reports and timeout logs.
It speaks lifespan (startup sets `started`), so `--request-timeout` is seen not to touch it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any
from urllib.parse import parse_qs

state = {"started": False, "finally": 0, "swallowed": 0}


def _seconds(scope: dict[str, Any], default: float = 30.0) -> float:
    return float(parse_qs(scope.get("query_string", b"").decode()).get("s", [default])[0])


async def _reply(send: Any, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"x-worker-pid", str(os.getpid()).encode())]})
    await send({"type": "http.response.body", "body": body})


def blocking_sleep(seconds: float) -> None:
    time.sleep(seconds)  # HANG-SLEEP: a C call, the GIL released


def pure_python_spin(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:  # HANG-SPIN: bytecode, never a C call for long
        n += 1  # HANG-SPIN too: a sample lands on either line of the loop
    return n


async def await_forever() -> None:
    await asyncio.get_running_loop().create_future()  # HANG-AWAIT: never resolved


async def stream_then_wait(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"first chunk\n", "more_body": True})
    await asyncio.sleep(3600)  # HANG-STREAM: the rest never comes


async def swallow_cancel(send: Any) -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        state["swallowed"] += 1  # and goes on, as if nothing happened
    await asyncio.sleep(3600)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["started"] = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/sleep":
        blocking_sleep(_seconds(scope))
        await _reply(send, b"slept\n")
    elif path == "/spin":
        pure_python_spin(_seconds(scope))
        await _reply(send, b"spun\n")
    elif path == "/forever":
        try:
            await await_forever()
        finally:
            state["finally"] += 1
    elif path == "/stream":
        await stream_then_wait(send)
    elif path == "/swallow":
        await swallow_cancel(send)
    elif path == "/state":
        await _reply(send, repr(sorted(state.items())).encode())
    else:
        await _reply(send, b"hello\n")
