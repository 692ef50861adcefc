"""Test app: the hello page plus endpoints that misbehave on purpose."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from typing import Any
from urllib.parse import parse_qs

from hello_cluster.app import app as hello

_leaked: list[bytes] = []  # what /leak keeps for good: a leak the worker never frees


def _seconds(scope: dict[str, Any]) -> float:
    query = parse_qs(scope.get("query_string", b"").decode())
    return float(query.get("s", ["2"])[0])


async def _reply(send: Any, body: bytes, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"x-worker-pid", str(os.getpid()).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await hello(scope, receive, send)
        return
    path = scope["path"]
    if path == "/slow":  # async wait: the loop keeps turning, the worker is healthy
        await asyncio.sleep(_seconds(scope))
        await _reply(send, b"slow done\n")
    elif path == "/block":  # blocks the event loop: the worker looks hung
        time.sleep(_seconds(scope))
        await _reply(send, b"block done\n")
    elif path == "/orphan":  # leave a grandchild whose parent exits at once
        subprocess.run(["sh", "-c", "sleep 0.2 &"], check=True)
        await _reply(send, b"orphan made\n")
    elif path == "/hog":  # touch this many MiB: meant to meet a cgroup memory limit
        query = parse_qs(scope.get("query_string", b"").decode())
        hog = b"\x01" * (int(query.get("mb", ["64"])[0]) * 1024 * 1024)
        await _reply(send, str(len(hog)).encode())
    elif path == "/leak":  # keep this many more MiB of private memory, as a leak would
        query = parse_qs(scope.get("query_string", b"").decode())
        _leaked.append(os.urandom(int(query.get("mb", ["64"])[0]) * 1024 * 1024))
        await _reply(send, f"{sum(map(len, _leaked))}".encode())
    elif path == "/env":  # which LISTEN_* variables the worker still sees
        names = sorted(k for k in os.environ if k.startswith("LISTEN_"))
        await _reply(send, ",".join(names).encode())
    elif path == "/client":  # the client address and scheme the app sees
        await _reply(send, f"{scope['client'][0]} {scope['scheme']}".encode())
    elif path == "/status":
        await _reply(send, b"teapot\n", 418)
    else:
        await hello(scope, receive, send)
